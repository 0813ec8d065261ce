"""Strong zeros: the shared reproductions, a table of programs per backward rule, and the semantics' edges.

Every expectation is an independent reference: the same program with the unused values deleted, or plain
PyTorch on finite data. None is a formula derived by hand.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import case_files
import gradwise as gw
from gradwise._strong_zeros._autograd_graph import _root_nodes, _walk
from gradwise._strong_zeros._mode import _StrongZeroMode
from gradwise._strong_zeros._node_facts import (
    _MAKES_NO_ZEROS_IF,
    COMPARES_SAVED_ONLY,
    FUSED_BACKWARDS,
    MAKES_NO_ZEROS,
    _makes_zeros,
)
from gradwise._strong_zeros._planning import _plan

nan, inf = float("nan"), float("inf")
aten = torch.ops.aten


def _shared_cases():
    """The acceptance cases (tests/cases/contamination.py; ../shared/cases's too where it differs)."""
    return [pytest.param(c, id=c.name if origin == "project" else f"shared-{c.name}")
            for origin, path in case_files.sources("contamination.py")
            for c in case_files.load(path, "sz").CASES]


@pytest.mark.parametrize("case", _shared_cases())
def test_shared_contamination_cases(case):
    output, inputs, expected = case.build()
    got = gw.grad(output, inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.to(g.dtype), equal_nan=True, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# One program per backward rule: NaN/Inf sits only where the program discards it. `program(x, keep)` is
# evaluated on the padded input; the reference is the same program on the kept part alone.
# ---------------------------------------------------------------------------------------------------------

torch.manual_seed(0)
W = torch.randn(6, 5, dtype=torch.float64)
CONV = torch.randn(3, 2, 3, 3, dtype=torch.float64)
BILINEAR = torch.randn(2, 3, 3, dtype=torch.float64)


def _rows(x: torch.Tensor, n: int = 4) -> torch.Tensor:
    return x[:n]


class _ForeachProduct(torch.autograd.Function):
    """a * b whose backward is one torch._foreach_mul (as optimizer-style or fused custom backwards write it)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        ga, gb = torch._foreach_mul([g, g], [b, a])
        return ga, gb


class _ForeachProductOut(_ForeachProduct):
    """The same, its backward writing into buffers (``_foreach_mul.List_out``)."""

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        torch.ops.aten._foreach_mul.List_out([g, g], [b, a], out=[ga, gb])
        return ga, gb


RULE_PROGRAMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    # name: (program on rows; discards rows >= 4, the backward op it exercises)
    "mm": (lambda x: _rows(x @ W).sum(), "aten.mm"),
    "bilinear": (lambda x: _rows(F.bilinear(x[:, :3], x[:, 3:].exp(), BILINEAR)).pow(2).sum(), "aten._trilinear"),
    "bmm": (lambda x: _rows(torch.bmm(x.unsqueeze(1), W.expand(x.shape[0], 6, 5))).sum(), "aten.bmm"),
    "gelu": (lambda x: _rows(F.gelu(x @ W)).pow(2).sum(), "aten.gelu_backward"),
    "relu": (lambda x: _rows(torch.relu(x @ W)).sum(), "aten.threshold_backward"),
    "sigmoid": (lambda x: _rows(torch.sigmoid(x @ W)).sum(), "aten.sigmoid_backward"),
    "tanh": (lambda x: _rows(torch.tanh(x @ W)).sum(), "aten.tanh_backward"),
    "hardtanh": (lambda x: _rows(F.hardtanh(x @ W)).sum(), "aten.hardtanh_backward"),
    "softmax": (lambda x: (_rows(torch.softmax(x @ W, 1)) * torch.arange(5.0, dtype=x.dtype)).sum(),
                "aten._softmax_backward_data"),
    "cross_entropy": (lambda x: F.cross_entropy(_rows(x @ W), torch.tensor([0, 1, 2, 3])),
                      "aten._log_softmax_backward_data"),
    "mse": (lambda x: F.mse_loss(_rows(x @ W), torch.ones(4, 5, dtype=x.dtype)), "aten.mse_loss_backward"),
    "mul_div": (lambda x: (_rows(x * 3.0 / 2.0) * _rows(x)).sum(), "aten.mul"),
    "exp": (lambda x: _rows(torch.exp(x)).sum(), "aten.mul"),
    "gather": (lambda x: torch.gather(x @ W, 1, torch.zeros(x.shape[0], 1, dtype=torch.long))[:4].sum(),
               "aten.gather"),
    "where": (lambda x: torch.where(torch.arange(x.shape[0])[:, None] < 4, x @ W, 0.0).sum(), "aten.where"),
    "masked_fill": (lambda x: (x @ W).masked_fill(torch.arange(x.shape[0])[:, None] >= 4, 0).sum(),
                    "aten.masked_fill"),
    "index": (lambda x: (x @ W)[torch.arange(4)].sum(), "aten.index_put"),
    "cat_split": (lambda x: torch.cat([x[:4], x[4:]]).split(4)[0].exp().sum(), "aten.cat"),
    "mean_dim": (lambda x: _rows((x @ W).mean(1)).sum(), "aten.mean"),
    "conv2d": (lambda x: F.conv2d(x.reshape(-1, 2, 3, 1).expand(-1, 2, 3, 3), CONV)[:4].sum(),
               "aten.convolution_backward"),
    "max_pool": (lambda x: F.max_pool1d((x @ W).unsqueeze(1), 2)[:4].sum(),
                 "aten.max_pool2d_with_indices_backward"),
    "avg_pool": (lambda x: F.avg_pool1d((x @ W).unsqueeze(1), 2)[:4].sum(), "aten.avg_pool2d_backward"),
    "embedding": (lambda x: F.embedding(torch.tensor([0, 1, 2, 3, 1]), x.exp()).pow(2).sum(),
                  "aten.embedding_dense_backward"),
    "sqrt_where": (lambda x: torch.where(x > 0, x.clamp_min(0).sqrt(), x)[:4].sum(), "aten.where"),
    "reflect_pad": (lambda x: F.pad((x * x).unsqueeze(0), (1, 1), mode="reflect")[0][:4].sum(),
                    "aten.reflection_pad1d_backward"),
    "replicate_pad": (lambda x: F.pad((x * x).unsqueeze(0), (1, 1), mode="replicate")[0][:4].sum(),
                      "aten.replication_pad1d_backward"),
    "xlogy": (lambda x: _rows(torch.xlogy(x, x.exp())).sum(), "aten.xlogy"),
    "xlog1py": (lambda x: _rows(torch.special.xlog1py(x, x.exp())).sum(), "aten.special_xlog1py"),
    "cdist": (lambda x: torch.cdist(x, x[:3].exp())[:4].sum(), "aten._cdist_backward"),
    "embedding_bag_weights": (  # x's rows are embedding dimensions here; rows >= 4 are discarded as columns
        lambda x: F.embedding_bag(torch.tensor([1, 2, 4, 5]), x.t(), torch.tensor([0, 2]),
                                  mode="sum", per_sample_weights=x[:4, 0].exp())[:, :4].sum(),
        "aten._embedding_bag_per_sample_weights_backward"),
    "pdist": (lambda x: torch.pdist(x)[torch.triu_indices(6, 6, 1)[1] < 4].square().sum(),  # pairs among rows < 4
              "aten._pdist_backward"),
    "masked_select": (lambda x: x.exp().masked_select(torch.arange(x.shape[0])[:, None] < 4).sum(),
                      "aten.masked_scatter"),
    "bicubic": (lambda x: F.interpolate(x.exp().reshape(1, 6, 1, 6), size=(1, 11), mode="bicubic")[0, :4].sum(),
                "aten.upsample_bicubic2d_backward"),  # rows are channels: interpolated one by one
    "nansum": (lambda x: torch.nansum(x.log()), "aten.mul"),  # its backward multiplies by ~isnan(x.log())
    "index_fill": (lambda x: x.exp().index_fill(0, torch.tensor([4, 5]), 0.0).sum(), "aten.index_fill"),
    "take": (lambda x: torch.take(x.exp(), torch.arange(24)).sum(), "aten.put"),
    # (its rule runs mul's per pair, so the log below the mode sees mul; on the base it was unruled)
    "foreach_mul": (lambda x: _rows(_ForeachProduct.apply(x, x.exp())).sum(), "aten.mul"),
    "foreach_mul_out": (lambda x: _rows(_ForeachProductOut.apply(x, x.exp())).sum(), "aten.mul"),
}


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _padded(poison: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    keep = torch.rand(4, 6, dtype=torch.float64) + 0.5
    return keep, torch.cat([keep, torch.full((2, 6), poison, dtype=torch.float64)])


@pytest.mark.parametrize("poison", [nan, inf, -inf])
@pytest.mark.parametrize("name", list(RULE_PROGRAMS))
def test_rule_programs_equal_program_without_unused_values(name, poison):
    program, op = RULE_PROGRAMS[name]
    keep, padded = _padded(poison)
    x = padded.clone().requires_grad_(True)
    gw.unruled_ops().clear()
    with _OpLog() as log:
        (got,) = gw.grad(program(x), x)
    assert op in log.ops, f"the program no longer exercises {op}"
    assert not gw.unruled_ops()
    k = keep.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(program(torch.cat([k, torch.zeros(2, 6, dtype=k.dtype)])), k)
    torch.testing.assert_close(got[:4], ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[4:], torch.zeros_like(got[4:]))


@pytest.mark.parametrize("name", list(RULE_PROGRAMS))
def test_rule_programs_bitwise_on_finite_data(name):
    program, _ = RULE_PROGRAMS[name]
    _, padded = _padded(0.25)
    x = padded.clone().requires_grad_(True)
    (got,) = gw.grad(program(x), x)
    (ref,) = torch.autograd.grad(program(x), x)
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------------------
# Semantics at the edges
# ---------------------------------------------------------------------------------------------------------


def test_arithmetic_zero_does_not_annihilate():
    """g*2 - g*2 is an ordinary zero: the output depends on the NaN, so the gradient keeps it."""
    x = torch.tensor([1.0, nan], requires_grad=True)
    w = torch.tensor([2.0, 3.0], requires_grad=True)
    y = x * w
    out = (y * 2 - y * 2).sum()
    (g,) = gw.grad(out, w)
    (ref,) = torch.autograd.grad((x * w * 2 - x * w * 2).sum(), w)
    assert torch.equal(g.isnan(), ref.isnan()) and g.isnan().any()


def test_strong_zero_path_matches_plain_where_plain_is_finite():
    """On the strong-zero path, elements PyTorch got right stay bitwise PyTorch's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 3)
    x = torch.randn(6, 8)
    x[5] = nan
    out = lin(x)
    loss = out[:5].sum() + out[:, 0].sum()  # row 5 column 0 is used: genuine NaN in the weight's row 0
    gw_w, gw_b = gw.grad(loss, (lin.weight, lin.bias), retain_graph=True)
    _, pt_b = torch.autograd.grad(loss, (lin.weight, lin.bias))
    assert gw_w[0].isnan().all() and torch.equal(pt_b, gw_b)
    ref = torch.autograd.grad(lin(x[:5]).sum(), lin.weight)[0]
    torch.testing.assert_close(gw_w[1:], ref[1:])


def test_backward_accumulates_and_frees_graph():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    x = torch.cat([torch.randn(3, 4), torch.full((2, 4), nan)])
    lin.weight.grad = torch.ones_like(lin.weight)
    loss = lin(x)[:3].sum()
    gw.backward(loss)
    ref = torch.autograd.grad(lin(x[:3]).sum(), lin.weight)[0] + 1
    torch.testing.assert_close(lin.weight.grad, ref)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_finite_backward_frees_graph_like_pytorch():
    x = torch.randn(3, requires_grad=True)
    loss = (x.sin() * 2).sum()
    gw.backward(loss)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    loss = (x.sin() * 2).sum()
    gw.backward(loss, retain_graph=True)
    loss.backward()


def test_context_manager_covers_tensor_backward_and_autograd_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)
    x = torch.cat([torch.randn(3, 4), torch.full((2, 4), nan)])
    with gw.strong_zeros(), gw.strong_zeros():  # nesting is fine
        lin(x)[:3].sum().backward()
        (g,) = torch.autograd.grad(lin(x)[:3].sum(), lin.bias)
    assert lin.weight.grad.isfinite().all() and g.isfinite().all()
    assert torch.autograd.grad(lin(x)[:3].sum(), lin.weight)[0].isnan().all()  # off again outside


def test_context_manager_is_thread_local():
    lin = torch.nn.Linear(4, 2)
    x = torch.cat([torch.randn(3, 4), torch.full((2, 4), nan)])
    seen = {}

    def other_thread():
        seen["grad"] = torch.autograd.grad(lin(x)[:3].sum(), lin.weight)[0]

    with gw.strong_zeros():
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert seen["grad"].isnan().all()


def test_a_compile_on_another_thread_does_not_turn_strong_zeros_off(monkeypatch):
    """torch.compiler.is_compiling() reads one flag for the whole process, True on every thread while any thread
    runs torch.compile (set here as such a compile sets it). An eager backward under strong zeros (or a watch) on
    this thread took that for a traced backward and stepped aside: the NaN stayed, with no word, and the watch saw
    no step. Reference: the same program with the unused element deleted."""
    x = torch.tensor([1.0, 2.0, nan], requires_grad=True)
    kept = x.detach()[:2].clone().requires_grad_(True)
    kept.tanh().sum().backward()
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)  # another thread compiling
    with gw.strong_zeros():
        x.tanh()[:2].sum().backward()
    torch.testing.assert_close(x.grad, torch.cat([kept.grad, torch.zeros(1)]), rtol=0, atol=0)
    with gw.watch() as found:
        x.tanh()[:2].sum().backward()
    assert [f.kind for f in found.findings] == ["contamination"]


def test_custom_function_and_checkpoint():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return 2 * g * a

    a = torch.tensor([1.5, nan], requires_grad=True)
    assert torch.equal(gw.grad(Square.apply(a)[0], a)[0], torch.tensor([3.0, 0.0]))

    w = torch.randn(4, 4, requires_grad=True)
    x = torch.cat([torch.randn(3, 4), torch.full((2, 4), nan)])
    out = checkpoint(lambda inp: torch.relu(inp @ w), x, use_reentrant=False)[:3].sum()
    (g,) = gw.grad(out, w)
    (ref,) = torch.autograd.grad(torch.relu(x[:3] @ w).sum(), w)
    torch.testing.assert_close(g, ref)


def test_double_backward_runs():
    """create_graph works: first-order values use strong zeros; the recorded graph is PyTorch's formulas."""
    x = torch.tensor([4.0, -1.0], requires_grad=True)
    (g,) = gw.grad(torch.where(x > 0, x.sqrt(), 0.0).sum(), x, create_graph=True)
    assert torch.equal(g.detach(), torch.tensor([0.25, 0.0]))
    (gg,) = torch.autograd.grad(g[0], x)
    torch.testing.assert_close(gg[0], torch.tensor(-1 / 32))


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda x: gw.grad(3.0, x), TypeError, "outputs must be a tensor"),
        (lambda x: gw.grad([x.sum(), 1.0], x), TypeError, "outputs[1] is a float"),
        (lambda x: gw.grad(x * 2, x), RuntimeError, "only for scalar outputs"),
        (lambda x: gw.grad(x.sum(), torch.ones(3)), RuntimeError, "does not require grad"),
        (lambda x: gw.grad(x.sum(), torch.ones(3, dtype=torch.long)), RuntimeError, "floating-point"),
        (lambda x: gw.backward(torch.ones(2).sum()), RuntimeError, "does not depend on any tensor"),
    ],
)
def test_bad_input_errors_name_the_problem(call, exc, words):
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        call(x)


def test_graph_already_freed_is_pytorchs_error():
    x = torch.ones(3, requires_grad=True)
    loss = (x.exp() * 2).sum()
    torch.autograd.grad(loss, x)
    with pytest.raises(RuntimeError, match="second time"):
        gw.grad(loss, x)


def test_unruled_ops_lists_backward_ops_without_rules():
    gw.unruled_ops().clear()
    a, tau = torch.geqrf(torch.randn(4, 3, dtype=torch.float64))
    other = torch.cat([torch.randn(4, 2, dtype=torch.float64), torch.full((4, 1), nan, dtype=torch.float64)], 1)
    other.requires_grad_()
    # ormqr's backward runs ormqr (a product of Householder reflections) on the sensitivity: not in the table
    gw.grad(torch.ormqr(a, tau, other)[:, :2].sum(), other)
    assert "aten.ormqr.default" in gw.unruled_ops()


# One program per node type the path check treats as making no structural zeros (MAKES_NO_ZEROS), built from
# such nodes only (no slicing or indexing): run under the strong-zero mode with full sensitivities, it must
# leave every support full.
_M = torch.rand(4, 4, dtype=torch.float64) + 0.5
NO_ZEROS_PROGRAMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "AccumulateGrad": lambda x: x,
    "AddBackward0": lambda x: x + x.exp(),
    "AddBackward1": lambda x: torch.ops.aten.add.Scalar(x, 2),
    "SubBackward0": lambda x: x - x.exp(),
    "SubBackward1": lambda x: torch.ops.aten.sub.Scalar(x, 2),
    "MulBackward0": lambda x: x * x.exp(),
    "MulBackward1": lambda x: torch.ops.aten.mul.Scalar(x, 2),
    "NegBackward0": lambda x: -x,
    "DivBackward0": lambda x: x / x.exp(),
    "DivBackward1": lambda x: torch.ops.aten.div.Scalar(x, 2),
    "SumBackward0": lambda x: x.sum(),
    "SumBackward1": lambda x: x.sum(0),
    "MeanBackward0": lambda x: x.mean(),
    "MeanBackward1": lambda x: x.mean(0),
    "TBackward0": lambda x: x.t(),
    "ViewBackward0": lambda x: x.view(-1),
    "UnsafeViewBackward0": lambda x: torch.matmul(x.view(2, 2, 4), _M),
    "ExpandBackward0": lambda x: x.sum(0, keepdim=True).expand(3, 4),
    "PermuteBackward0": lambda x: x.view(2, 2, 4).permute(2, 0, 1),
    "TransposeBackward0": lambda x: x.view(2, 2, 4).transpose(0, 1),
    "SqueezeBackward0": lambda x: x.unsqueeze(0).exp().squeeze(),
    "SqueezeBackward1": lambda x: x.unsqueeze(0).exp().squeeze(0),
    "SqueezeBackward2": lambda x: x.unsqueeze(0).exp().squeeze((0,)),
    "UnsqueezeBackward0": lambda x: x.unsqueeze(0),
    "CloneBackward0": lambda x: x.clone(),
    "ToCopyBackward0": lambda x: x.to(torch.float32),
    "AliasBackward0": lambda x: torch.ops.aten.alias(x),
    "AddmmBackward0": lambda x: F.linear(x, _M, _M[0]),
    "MmBackward0": lambda x: x @ x.exp(),
    "BmmBackward0": lambda x: torch.bmm(x.view(2, 2, 4), x.view(2, 4, 2)),
    "BaddbmmBackward0": lambda x: torch.baddbmm(x.view(2, 2, 4).exp() @ x.view(2, 4, 2), x.view(2, 2, 4),
                                                x.view(2, 4, 2)),
    "MvBackward0": lambda x: x @ x.sum(0),
    "AddmvBackward0": lambda x: torch.addmv(x[0], x, x[1], alpha=0.5),
    "AddbmmBackward0": lambda x: torch.addbmm(x, x.view(2, 4, 2), x.view(2, 2, 4), alpha=2),
    "GeluBackward0": F.gelu,
    "SigmoidBackward0": torch.sigmoid,
    "TanhBackward0": torch.tanh,
    "SiluBackward0": F.silu,
    "SoftplusBackward0": F.softplus,
    "ExpBackward0": torch.exp,
    "MseLossBackward0": lambda x: F.mse_loss(x, _M),
    "SqrtBackward0": torch.sqrt,
    "RsqrtBackward0": torch.rsqrt,  # RMS norm's
    "LogBackward0": torch.log,
    "PowBackward0": lambda x: x**2,
    "ConvolutionBackward0": lambda x: F.conv2d(x.view(1, 1, 4, 4), _M[:3, :3].reshape(1, 1, 3, 3), padding=1),
    "NativeLayerNormBackward0": lambda x: F.layer_norm(x, (4,), _M[0], _M[1]),
    "NativeBatchNormBackward0": lambda x: F.batch_norm(x, None, None, _M[0], _M[1], training=True),
    "NativeGroupNormBackward0": lambda x: F.group_norm(x.view(1, 4, 4), 2, _M[0], _M[1]),
    "CatBackward0": lambda x: torch.cat([x, x.exp()], 1),
    "StackBackward0": lambda x: torch.stack([x, x.exp()]),
    "RepeatBackward0": lambda x: x.repeat(2, 3),
    "FlipBackward0": lambda x: x.flip(0, 1),
    "RollBackward0": lambda x: x.roll((1, -2), (0, 1)),
    "ViewAsRealBackward0": lambda x: torch.view_as_real(torch.complex(x, x.exp())),
    "ComplexBackward0": lambda x: torch.view_as_real(torch.complex(x, x.exp())),
    "ViewAsComplexBackward0": lambda x: torch.view_as_real(torch.view_as_complex(torch.stack((x, x.exp()), -1)) * 2),
    "ConjBackward0": lambda x: torch.view_as_real(torch.complex(x, x.exp()).conj() * 2),
    "ConstantPadNdBackward0": lambda x: F.pad(x, (1, 2, 0, 3)),
    # selections that read every position (their rule writes each one, so no mask stays False)
    "IndexBackward0": lambda x: x[torch.tensor([3, 2, 1, 0, 0])],
    "IndexSelectBackward0": lambda x: x.index_select(1, torch.tensor([3, 0, 1, 2, 2])),
    "SliceBackward0": lambda x: x[0:4],
    "SelectBackward0": lambda x: x.view(1, 4, 4).select(0, 0),
    "ScaledDotProductFlashAttentionForCpuBackward0":
        lambda x: F.scaled_dot_product_attention(x.view(1, 1, 4, 4), x.view(1, 1, 4, 4).exp(), x.view(1, 1, 4, 4)),
}


_CUDA_ONLY_NODES = {"ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductFlashAttentionBackward0",
                    "ScaledDotProductCudnnAttentionBackward0", "EfficientAttentionBackward0", "FlashAttentionBackward0",
                    "FusedRmsNormBackward0"}


@pytest.mark.parametrize("name", sorted(MAKES_NO_ZEROS | set(_MAKES_NO_ZEROS_IF) | set(FUSED_BACKWARDS)))
def test_nodes_that_make_no_structural_zeros(name):
    """The path check reads no saved tensor above these nodes: their backward must make no structural zero."""
    if name in _CUDA_ONLY_NODES:
        pytest.skip("a CUDA-only backward (fused attention, fused RMS norm): tests/test_cuda.py checks it on a "
                    "device; tests/test_attention.py and test_fused_rms_norm_backward_decomposes run their rules "
                    "through CPU stand-ins")
    assert name in NO_ZEROS_PROGRAMS, f"add a program producing {name} to NO_ZEROS_PROGRAMS"
    x = (torch.rand(4, 4, dtype=torch.float64) + 0.5).requires_grad_()
    out = NO_ZEROS_PROGRAMS[name](x)
    assert name in {type(n).__name__ for n in _walk(_root_nodes([out]))}
    mode = _StrongZeroMode()
    with mode:
        (g,) = torch.autograd.grad(out, x, torch.rand_like(out) + 0.5)
    if name in _MAKES_NO_ZEROS_IF:  # a rule may build the gradient from zeros, as long as it fills every position
        support = mode.supports.of(g)
        assert support is None or bool(support.all()), f"{name}'s backward made a structural zero"
    else:
        assert not mode.supports._masks, f"{name}'s backward made a structural zero"
    assert g.isfinite().all()


def test_power_zero_makes_structural_zeros():
    """x ** 0: pow's backward returns zeros_like(x), so PowBackward0 counts as making zeros there."""
    x = torch.rand(3, dtype=torch.float64, requires_grad=True)
    node = (x**0).grad_fn
    assert _makes_zeros(node) and not _makes_zeros((x**2).grad_fn)


def test_cropping_pad_makes_structural_zeros():
    """F.pad with a negative pad crops: its backward pads the sensitivity with zeros (a maker); padding out does not."""
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    assert _makes_zeros(F.pad(x, (-1, 1)).grad_fn) and not _makes_zeros(F.pad(x, (0, 1)).grad_fn)
    mode = _StrongZeroMode()
    with mode:
        (g,) = torch.autograd.grad(F.pad(x, (-1, 1)).sum(), x)
    assert mode.supports._masks and (g[:, 0] == 0).all()


@pytest.mark.parametrize(("stride", "dilation", "kernel"), [(1, 1, 3), (1, 1, 1), (2, 1, 1), (2, 1, 3), (1, 2, 3),
                                                         (3, 2, 2)])
def test_convolution_counts_as_making_zeros_where_it_can(stride, dilation, kernel):
    """A stride-1, dilation-1 convolution reads every input position: its backward makes no structural zero
    and the path check treats it as making none. Any other convolution counts as making zeros (a strided one
    can leave positions unread, as with kernel 1 and stride 2); whenever the mode does record a structural
    zero, the path check must have counted the node as a zero-maker."""
    x = (torch.rand(1, 2, 7, 7, dtype=torch.float64) + 0.5).requires_grad_()
    w = torch.rand(3, 2, kernel, kernel, dtype=torch.float64) + 0.5
    out = F.conv2d(x, w, stride=stride, dilation=dilation, padding=kernel // 2)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"
    mode = _StrongZeroMode()
    with mode:
        (g,) = torch.autograd.grad(out, x, torch.rand_like(out) + 0.5)
    made = bool(mode.supports._masks)
    assert _makes_zeros(out.grad_fn) == (stride != 1 or dilation != 1)
    if made:
        assert _makes_zeros(out.grad_fn)
    if stride == dilation == 1:
        assert not made and (g != 0).all()
    if (stride, kernel) == (2, 1):
        assert made and (g == 0).any()  # the control: positions no window reads get a structural zero


def test_positions_a_strided_convolution_never_reads_do_not_contaminate():
    """NaN at the positions a kernel-1, stride-2 convolution skips: the layer before still sees them, and its
    weight gradient is 0 x NaN in PyTorch; gradwise's equals the program with those positions set to 0."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    x[..., 1::2, :] = float("nan")
    x[..., 1::2] = float("inf")
    w0 = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)

    def f(x):
        return F.conv2d(F.conv2d(x, w0).tanh(), w1, stride=2).square().sum()

    assert torch.autograd.grad(f(x), w0)[0].isnan().all()
    got = gw.grad(f(x), (w0, w1))
    expected = torch.autograd.grad(f(torch.nan_to_num(x, nan=0.0, posinf=0.0)), (w0, w1))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_slicing_makes_structural_zeros():
    """The control for the table above: a slice's backward pads with structural zeros, and the mode sees it."""
    x = torch.rand(4, dtype=torch.float64, requires_grad=True)
    mode = _StrongZeroMode()
    with mode:
        torch.autograd.grad(x[:2].sum(), x)
    assert mode.supports._masks and _makes_zeros(x[:2].grad_fn)


@pytest.mark.parametrize(("name", "f"), [("ReluBackward0", torch.relu),
                                         ("ThresholdBackward0", lambda x: F.threshold(x, 0.5, 0.0)),
                                         ("HardtanhBackward0", F.hardtanh)])
def test_nodes_that_only_compare_their_saved_tensor(name, f):
    """The path check skips these nodes' saved tensors (COMPARES_SAVED_ONLY): NaN/Inf saved there must not
    turn a finite sensitivity, zeros included, into NaN/Inf."""
    assert name in COMPARES_SAVED_ONLY
    x = torch.tensor([1.0, float("nan"), float("inf"), float("-inf"), -1.0, 0.0], requires_grad=True)
    y = f(x)
    assert type(y.grad_fn).__name__ == name
    for seed in (torch.zeros(6), torch.tensor([1.0, 0.0, -2.0, 0.0, 3.0, 0.5])):
        (g,) = torch.autograd.grad(y, x, seed, retain_graph=True)
        assert g.isfinite().all(), g


def test_freed_storage_behind_an_offset_view_is_not_read():
    """FSDP1 keeps parameters as views into a flat buffer freed between uses and refilled by a hook: the path
    check must see that the storage is gone although the view's data pointer (its offset) is not 0."""
    flat = torch.randn(30)
    w = flat[10:20].view(2, 5).requires_grad_()
    x = torch.randn(4, 5, requires_grad=True)
    out = (x @ w.t())[:1].sum()
    kept = flat.clone()
    flat.untyped_storage().resize_(0)

    def refill(_):
        flat.untyped_storage().resize_(kept.numel() * kept.element_size())
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(flat):
            flat.copy_(kept)

    out.grad_fn.register_prehook(refill)
    with gw.strong_zeros():
        out.backward()
    assert x.grad.isfinite().all() and w.grad.isfinite().all()


def test_decomposed_backward_keeps_pytorchs_bits_where_finite():
    """A sqrt(0) behind a where sends the whole backward through the strong-zero pass, where the layer norm's
    backward meets structural zeros (the slice) and runs as its decomposition: wherever the fused kernel's
    result is finite, it is the one returned, bit for bit."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    x = torch.randn(32, 8)
    z = torch.zeros(3, requires_grad=True)

    def loss():
        return norm(x)[:16].square().sum() + torch.where(z > 0, z.sqrt(), z).sum()

    assert _plan([loss()], [None]) == "strong"
    got = gw.grad(loss(), [norm.weight, norm.bias, z])
    expected = torch.autograd.grad(loss(), [norm.weight, norm.bias, z])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert expected[2].isnan().all() and torch.equal(got[2], torch.ones(3))


@pytest.mark.parametrize(("name", "make", "shape"), [
    ("layer_norm_bfloat16", lambda: nn.LayerNorm(8).bfloat16(), (8, 8)),
    ("layer_norm", lambda: nn.LayerNorm(8), (8, 8)),
    ("group_norm", lambda: nn.GroupNorm(2, 4), (8, 4, 3)),
    ("instance_norm", lambda: nn.InstanceNorm1d(4, affine=True), (8, 4, 5)),
    ("batch_norm_eval", lambda: nn.BatchNorm1d(4).eval(), (8, 4)),
])
def test_normalisation_rows_sliced_away(name, make, shape):
    """NaN rows 4..7 that a slice after the normalisation discards: PyTorch's weight gradient is NaN (its fused
    backward sums 0 x NaN over the rows); gradwise's equals that of the program run on rows 0..3 only."""
    torch.manual_seed(0)
    norm = make()
    dtype = norm.weight.dtype if norm.weight.dtype == torch.bfloat16 else torch.float64
    norm = norm.to(dtype)
    x = torch.randn(shape, dtype=dtype)
    x[4:] = float("nan")
    params = list(norm.parameters())
    assert torch.autograd.grad(norm(x)[:4].square().sum(), params)[0].isnan().any()
    got = gw.grad(norm(x)[:4].square().sum(), params)
    expected = torch.autograd.grad(norm(x[:4]).square().sum(), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-2 if dtype == torch.bfloat16 else None,
                                   atol=2e-2 if dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("group", [False, True])
def test_path_check_sees_a_normalised_nan_through_its_statistics(fill, group):
    """The path check reads a layer/group norm's saved mean and rstd, not its input: one NaN/Inf element of a
    row (group) must still make them non-finite, so the backward takes the strong-zero pass."""
    norm = (nn.GroupNorm(2, 4) if group else nn.LayerNorm(8)).double()
    x = torch.randn((8, 4, 3) if group else (8, 8), dtype=torch.float64)
    x[6].view(-1)[3] = fill
    loss = norm(x)[:4].square().sum()
    assert _plan([loss], [None]) == "strong"
    assert gw.grad(loss, norm.weight)[0].isfinite().all()


def test_normalisation_keeps_a_nan_the_output_uses():
    """Controls: a NaN row that is used keeps the weight gradient NaN; with only some columns of it used, the
    columns no row's output uses get 0 and the used ones stay NaN (as in the program without those columns)."""
    norm = nn.LayerNorm(8).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    x[5] = float("nan")
    assert gw.grad(norm(x).sum(), norm.weight)[0].isnan().all()
    (g,) = gw.grad(norm(x)[:, :4].square().sum(), norm.weight)
    assert g[:4].isnan().all() and torch.equal(g[4:], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bilinear_rows_sliced_away(dtype):
    """nn.Bilinear on a batch whose rows 4..7 are NaN/Inf, sliced away after the layer: PyTorch's weight
    gradient is NaN (aten._trilinear sums 0 x NaN over the batch); gradwise's, and the inputs' gradients, equal
    those of the program run on rows 0..3 only (the discarded rows' input gradients are 0)."""
    torch.manual_seed(0)
    layer = nn.Bilinear(3, 4, 2).to(dtype)
    x1, x2 = torch.randn(8, 3, dtype=dtype), torch.randn(8, 4, dtype=dtype)
    x1[4:], x2[6:] = nan, inf
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    params = list(layer.parameters())
    assert torch.autograd.grad(layer(a, b)[:4].square().sum(), params)[0].isnan().all()
    got = gw.grad(layer(a, b)[:4].square().sum(), [*params, a, b])
    a4, b4 = x1[:4].clone().requires_grad_(), x2[:4].clone().requires_grad_()
    expected = torch.autograd.grad(layer(a4, b4).square().sum(), [*params, a4, b4])
    for g, e in zip(got[:2], expected[:2], strict=True):
        torch.testing.assert_close(g, e)
    for g, e in zip(got[2:], expected[2:], strict=True):
        torch.testing.assert_close(g[:4], e)
        assert torch.equal(g[4:], torch.zeros_like(g[4:]))


def test_bilinear_keeps_a_nan_the_output_uses():
    """Control: a NaN row the output uses keeps the weight gradient NaN under gradwise too."""
    layer = nn.Bilinear(3, 4, 2).double()
    x1, x2 = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    x1[5] = nan
    assert gw.grad(layer(x1, x2).square().sum(), layer.weight)[0].isnan().all()


_SPD = torch.randn(4, 4, dtype=torch.float64)
_SPD = _SPD @ _SPD.T + 4 * torch.eye(4, dtype=torch.float64)


@pytest.mark.parametrize(("name", "solve", "matrix"), [
    ("solve_triangular", lambda a, b: torch.linalg.solve_triangular(a, b, upper=False), torch.linalg.cholesky(_SPD)),
    ("solve_triangular_right", lambda a, b: torch.linalg.solve_triangular(a, b.mT, upper=False, left=False).mT,
     torch.linalg.cholesky(_SPD)),
    ("cholesky_solve", lambda a, b: torch.cholesky_solve(b, a), torch.linalg.cholesky(_SPD)),
    ("lu_solve", torch.linalg.solve, _SPD),
])
def test_solution_columns_sliced_away(name, solve, matrix):
    """A X = B with NaN/Inf in B's columns 3..4, those columns of X sliced away: PyTorch's gradient of A is
    NaN (the product after the solve sums 0 x NaN over the columns); gradwise's equals that of the program
    solving for columns 0..2 only."""
    torch.manual_seed(0)
    b = torch.randn(4, 5, dtype=torch.float64)
    b[:, 3], b[:, 4] = nan, -inf
    a = matrix.clone().requires_grad_()
    assert torch.autograd.grad(solve(a, b)[:, :3].square().sum(), a)[0].isnan().any()
    gw.unruled_ops().clear()
    (got,) = gw.grad(solve(a, b)[:, :3].square().sum(), a)
    assert not gw.unruled_ops()
    (expected,) = torch.autograd.grad(solve(a, b[:, :3]).square().sum(), a)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_padded_convolutions_with_a_nan_border_cropped(mode):
    """Two convolutions with padding_mode reflect/replicate over an image with a NaN frame of width 2, cropped
    to the outputs that never see it: PyTorch's weight gradients are NaN (the pad's backward and the
    convolutions sum 0 x NaN), gradwise's equal those of the same program with a finite frame."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode), nn.Tanh(),
                        nn.Conv2d(3, 2, 3, padding=1, padding_mode=mode)).double()
    img = torch.randn(1, 2, 12, 12, dtype=torch.float64)
    params = list(net.parameters())

    def loss(frame):
        return net(F.pad(img, (2, 2, 2, 2), value=frame))[..., 4:12, 4:12].square().sum()

    assert torch.autograd.grad(loss(nan), params)[0].isnan().any()
    gw.unruled_ops().clear()
    got = gw.grad(loss(nan), params)
    assert not gw.unruled_ops()
    for g, e in zip(got, torch.autograd.grad(loss(0.25), params), strict=True):
        torch.testing.assert_close(g, e)


# One layer per backward op that the rule programs above do not reach: the batch's second half is NaN and sliced
# away after the layer. gradwise must equal the layer run on the first half alone, and meet no op without a rule.
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d_circular": (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (4, 2, 8)),
    "adaptive_max_pool2d": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.AdaptiveMaxPool2d(2)), (4, 2, 6, 6)),
    "upsample_trilinear": (lambda: nn.Sequential(nn.Conv3d(2, 2, 1), nn.Upsample(scale_factor=2, mode="trilinear")),
                           (4, 2, 3, 3, 3)),
    "upsample_nearest3d": (lambda: nn.Sequential(nn.Conv3d(2, 2, 1), nn.Upsample(scale_factor=2)), (4, 2, 3, 3, 3)),
    "pixel_shuffle": (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.PixelShuffle(2)), (4, 4, 3, 3)),
    "pixel_unshuffle": (lambda: nn.Sequential(nn.Conv2d(2, 2, 1), nn.PixelUnshuffle(2)), (4, 2, 4, 4)),
    "glu": (lambda: nn.Sequential(nn.Linear(4, 6), nn.GLU()), (4, 4)),
    "softshrink": (lambda: nn.Sequential(nn.Linear(4, 4), nn.Softshrink()), (4, 4)),
    "hardshrink": (lambda: nn.Sequential(nn.Linear(4, 4), nn.Hardshrink()), (4, 4)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_with_nan_rows_sliced_away(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make().double()
    half = shape[0] // 2
    x = torch.randn(shape, dtype=torch.float64)
    x[half:] = nan
    params = list(layer.parameters())
    a = x.clone().requires_grad_()
    gw.unruled_ops().clear()
    got = gw.grad(layer(a)[:half].square().sum(), [*params, a])
    assert not gw.unruled_ops()
    clean = x[:half].clone().requires_grad_()
    expected = torch.autograd.grad(layer(clean).square().sum(), [*params, clean])
    for g, e in zip(got[:-1], expected[:-1], strict=True):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(got[-1][:half], expected[-1])
    assert torch.equal(got[-1][half:], torch.zeros_like(got[-1][half:]))


@pytest.mark.parametrize("concatenated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctc_infeasible_samples_dropped(concatenated, dtype):
    """A sample whose target cannot be aligned has an infinite CTC loss; keeping only the finite losses must give
    the gradient of the batch without that sample (PyTorch: NaN in its log_probs column and, through the
    log_softmax, nothing else: here the NaN reaches the shared weight)."""
    torch.manual_seed(5)
    T, N, C = 5, 3, 4
    w = torch.randn(C, C, dtype=dtype, requires_grad=True)
    h = torch.randn(T, N, C, dtype=dtype)
    padded = torch.tensor([[1, 2, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [3, 1, 2, 0, 0, 0]])
    in_len, tg_len = torch.tensor([5, 5, 5]), torch.tensor([2, 6, 3])  # sample 1 needs > 5 frames: infeasible
    targets = torch.cat([padded[i, :tg_len[i]] for i in range(N)]) if concatenated else padded

    def losses(cols):
        t = torch.cat([padded[i, :tg_len[i]] for i in cols]) if concatenated else padded[cols]
        return F.ctc_loss((h[:, cols] @ w).log_softmax(2), t, in_len[cols], tg_len[cols], reduction="none")

    full = F.ctc_loss((h @ w).log_softmax(2), targets, in_len, tg_len, reduction="none")
    assert not full[1].isfinite()
    loss = full[full.isfinite()].sum()
    assert torch.autograd.grad(loss, w, retain_graph=True)[0].isnan().all()
    (got,) = gw.grad(loss, w)
    (expected,) = torch.autograd.grad(losses([0, 2]).sum(), w)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reduce", ["max", "amax", "median", "nanmedian", "logsumexp"])
def test_unselected_elements_of_a_reduction_are_structural(reduce):
    """max/amax/median multiply the gradient by the mask `x == result`, logsumexp by exp(x - result): a
    non-selected log(0) = -inf (0 there, and 0 x Inf in PyTorch) must not reach the gradient. Reference: the
    reduction over the kept elements only (3 is the largest; logsumexp of -inf adds nothing)."""
    a = torch.arange(4.0, dtype=torch.float64, requires_grad=True)
    fn = {"max": torch.max, "amax": lambda t: t.amax(0), "median": lambda t: torch.cat([t, t[3:]]).median(),
          "nanmedian": lambda t: torch.cat([t, t[3:]]).nanmedian(), "logsumexp": lambda t: t.logsumexp(0)}[reduce]
    loss = fn(a.log())
    assert torch.autograd.grad(loss, a, retain_graph=True)[0].isnan().any()
    (got,) = gw.grad(loss, a)
    kept = a.detach()[1:].clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(fn(kept.log()), kept)
    assert torch.equal(got[0], torch.zeros((), dtype=a.dtype))
    torch.testing.assert_close(got[1:], ref)


_MASK = torch.tensor([True, False])
# Programs whose NaN/Inf the output really uses (the loss is NaN): gw.grad must be PyTorch's gradient, NaN where
# PyTorch's is. Each once broke a rule (a review of the rules for hiding genuine values).
GENUINE_PROGRAMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[float]]] = {
    # a bool tensor the forward multiplies by is a value, not a selection: -log(0) * False = NaN is used
    "times_a_user_mask": (lambda x: (-x.log() * _MASK)[:2].sum(), [0.5, 0.0]),
    # erf's backward computes exp(-x**2): at x = inf an arithmetic 0, met by a used NaN
    "erf_at_inf": (lambda x: (torch.erf(x) * torch.tensor([nan, 1.0], dtype=x.dtype))[:2].sum(), [inf, 1.0]),
    # relu(NaN) = NaN is used: a NaN input is in no flat region
    "relu_of_nan": (lambda x: (x * torch.tensor([nan, 1.0], dtype=x.dtype)).relu()[:2].sum(), [1.0, 2.0]),
}


@pytest.mark.parametrize("name", list(GENUINE_PROGRAMS))
def test_genuine_nan_is_never_hidden(name):
    program, values = GENUINE_PROGRAMS[name]
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    loss = program(x)
    assert not loss.isfinite()
    (expected,) = torch.autograd.grad(loss, x, retain_graph=True)
    assert expected.isnan().any()
    with gw.strong_zeros():  # the strong pass whatever the check decides
        (got,) = torch.autograd.grad(program(x), x)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_a_nan_maximum_keeps_its_nan():
    """amax over a row whose maximum is NaN: its mask `x == result` is False everywhere in that row. The NaN
    element is the one selected: its gradient stays NaN (PyTorch: the whole row); the others are unselected."""
    x = torch.tensor([[1.0, nan, 2.0], [3.0, 4.0, 5.0]], dtype=torch.float64, requires_grad=True)
    with gw.strong_zeros():
        (got,) = torch.autograd.grad(x.amax(1).sum(), x)
    assert got[0, 1].isnan() and torch.equal(got[1], torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype))


@pytest.mark.parametrize("program", [
    lambda x: (torch.arange(3) / x)[:2].sum(),  # integer numerator: div's singular test
    lambda x: (torch.tensor([True, False, True]) / x)[:2].sum(),  # bool numerator
    lambda x: (torch.complex(x, x) ** 1.5).abs()[:2].sum(),  # complex intermediates: pow's test
    lambda x: torch.complex(x, x).reciprocal().abs()[:2].sum(),  # reciprocal's
], ids=["int_numerator", "bool_numerator", "complex_pow", "complex_reciprocal"])
def test_singular_tests_accept_any_dtype(program):
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert torch.equal(gw.grad(program(x), x)[0], torch.autograd.grad(program(x), x)[0])


def test_fused_rms_norm_backward_decomposes():
    """CUDA's nn.RMSNorm backward is one fused op, aten._fused_rms_norm_backward (no CPU kernel: a CPU stand-in
    with its schema, PyTorch's own decomposition, stands for it here). NaN rows sliced away after the norm: the
    strong pass runs it as its decomposition, so the weight gradient is that of the rows kept."""
    op = aten._fused_rms_norm_backward
    lib = torch.library.Library("aten", "IMPL")
    from torch._decomp import decomposition_table

    lib.impl("_fused_rms_norm_backward", decomposition_table[op.default], "CPU")

    class FusedRms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
            ctx.save_for_backward(x, rstd, w)
            return x * rstd * w

        @staticmethod
        def backward(ctx, g):
            x, rstd, w = ctx.saved_tensors
            return op(g, x, [x.shape[-1]], rstd, w, [True, True])

    try:
        x = torch.randn(6, 8, dtype=torch.float64)
        x[4:] = nan
        w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
        loss = FusedRms.apply(x, w)[:4].square().sum()
        assert not torch.autograd.grad(loss, w, retain_graph=True)[0].isfinite().all()
        (got,) = gw.grad(loss, [w])
        (exp,) = torch.autograd.grad(FusedRms.apply(x[:4], w).square().sum(), [w])
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
    finally:
        lib._destroy()


@pytest.mark.parametrize("make", [lambda: nn.LSTM(8, 4, dtype=torch.float64), lambda: nn.GRU(8, 4, dtype=torch.float64),
                                  lambda: nn.MultiheadAttention(8, 2, dtype=torch.float64)], ids=["lstm", "gru", "mha"])
def test_rnns_and_attention_plan_plain_to_second_order(make):
    """Finite RNNs and attention, first and second order (gradgradcheck's graphs): every node is known, so the
    backward runs as plain PyTorch, without the strong pass (it made PyTorch's gradgrad tests of LSTM and
    MultiheadAttention 5x slower)."""
    module = make()
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    out = module(x, x, x)[0] if isinstance(module, nn.MultiheadAttention) else module(x)[0]
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert _plan([out.sum()], ()) == "plain"
    assert _plan([g.square().sum()], ()) == "plain"


@settings(derandomize=True, max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), st.data())
def test_sum_support_is_the_any_of_the_summed_supports(shape, data):
    """sum/mean's support (one byte reduction) equals running the op on the supports as 0/1 numbers (_placement's
    count, the reference), for every dims/keepdim form the op takes."""
    from gradwise._strong_zeros._rules_pointwise import _placement_counts, _summed
    from gradwise._strong_zeros._supports import _Supports

    support = torch.tensor(data.draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape))),
                           dtype=torch.bool).reshape(shape)
    dims = data.draw(st.one_of(st.none(), st.lists(st.integers(-len(shape), len(shape) - 1) if shape else
                                                   st.sampled_from([0, -1]), unique=True, max_size=max(len(shape), 1))))
    keepdim = data.draw(st.booleans())
    op = data.draw(st.sampled_from([aten.sum, aten.mean]))
    if dims is not None and len({d % max(len(shape), 1) for d in dims}) != len(dims):
        return
    args = (None,) if dims is None else (None, dims, keepdim)
    got, ref = [], []
    for rule, into in ((_summed, got), (_placement_counts, ref)):
        sup = _Supports()
        x = torch.randn(shape, dtype=torch.float64)
        sup.record(x, support)
        x_args = (x, *args[1:])
        overload = op.default if dims is None else op.dim if op is aten.mean else op.dim_IntList
        out = rule(overload, x_args, {}, sup) if rule is _summed else rule(overload, x_args, {}, sup,
                                                                             overload(*x_args))
        s = sup.of(out)
        into.append(torch.ones(out.shape, dtype=torch.bool) if s is None else s)
    assert torch.equal(got[0], ref[0]), (shape, dims, keepdim)


def MOVED_SAMPLES(x, s, n, k, idx):
    """One call per op of _moved's table, with the sensitivity's (bool) support first: the rule is run with a
    random sensitivity of that support (tests below)."""
    return [
        (aten.slice_backward.default, (s[:, k:], [2, n + 1], 1, k + 1, n + 1, 1)),
        (aten.select_backward.default, (s[0], [3, n], 0, 1)),
        (aten.diagonal_backward.default, (s[:, :1].reshape(2), [2, 2, n], 0, 0, 1)),
        (aten.constant_pad_nd.default, (s, [1, k - n])),
        (aten.flip.default, (s, [0, 1])),
        (aten.roll.default, (s, [k], [1])),
        (aten.repeat.default, (s, [2, 3])),
        (aten.gather.default, (s, 1, idx.expand(2, -1).contiguous())),
        (aten.index_select.default, (s, 1, idx)),
        (aten.tril.default, (s, k - 1)),
        (aten.triu.default, (s, 1 - k)),
        (aten.rot90.default, (s, 1, [0, 1])),
        (aten.take.default, (s, idx)),
    ]


@settings(derandomize=True, max_examples=150, deadline=None)
@given(st.integers(1, 6), st.data())
def test_relu_and_moving_supports_match_their_references(n, data):
    """threshold_backward's and hardtanh_backward's support is grad's and not the flat region (NaN is in none),
    and that of every op that only moves elements (_moved) is the op on the 0/1 support (_placement's count, the
    reference); the outputs are PyTorch's, bitwise."""
    from gradwise._strong_zeros._rules import lookup
    from gradwise._strong_zeros._rules_pointwise import _moved, _placement_counts
    from gradwise._strong_zeros._supports import _Supports

    _threshold_backward, _hardtanh_backward = map(lookup, (aten.threshold_backward.default,
                                                           aten.hardtanh_backward.default))

    values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, nan, inf, -inf])
    x = torch.tensor(data.draw(st.lists(values, min_size=2 * n, max_size=2 * n)), dtype=torch.float64).view(2, n)
    s = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * n, max_size=2 * n))).view(2, n)
    tracked = data.draw(st.booleans())

    def run(rule, func, args, support):
        sup = _Supports()
        grad = torch.randn(args[0].shape, dtype=torch.float64)
        if tracked:
            grad.masked_fill_(~support, 0)
            sup.record(grad, support)
        out = rule(func, (grad, *args[1:]), {}, sup)
        got = sup.of(out)
        return out, grad, torch.ones(out.shape, dtype=torch.bool) if got is None else got

    out, grad, got = run(_threshold_backward, aten.threshold_backward.default, (x, x, 0.0), s)
    assert torch.equal(out, aten.threshold_backward(grad, x, 0.0))
    # the rule relies on the kernel selecting: a NaN sensitivity in the flat region (a structural zero) gives 0
    nan_grad = torch.full_like(x, nan)
    assert (aten.threshold_backward(nan_grad, x, 0.0)[x <= 0] == 0).all()
    assert torch.equal(got, (s if tracked else True) & ((x > 0) | x.isnan()))
    # ReLU6's backward
    out, grad, got = run(_hardtanh_backward, aten.hardtanh_backward.default, (x, x, -0.5, 1.0), s)
    assert torch.equal(out, aten.hardtanh_backward(grad, x, -0.5, 1.0))
    assert torch.equal(got, (s if tracked else True) & (((x > -0.5) & (x < 1.0)) | x.isnan()))
    assert (aten.hardtanh_backward(nan_grad, x, -0.5, 1.0)[(x <= -0.5) | (x >= 1.0)] == 0).all()
    k = data.draw(st.integers(0, n))
    idx = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)))
    for func, args in MOVED_SAMPLES(x, s, n, k, idx):
        support = args[0] if isinstance(args[0], torch.Tensor) else None
        if support is None:
            continue
        out, grad, got = run(_moved, func, args, support)
        _, _, ref = run(lambda f, a, kw, sup: _placement_counts(f, a, kw, sup, f(*a)), func, args, support)
        assert torch.equal(out, func(grad, *args[1:])) and torch.equal(got, ref), func
    for func in (aten.cat.default, aten.stack.default):  # a list: one tracked sensitivity, one fully supported
        sups = []
        for rule in (_moved, lambda f, a, kw, sup: _placement_counts(f, a, kw, sup, f(*a))):
            sup = _Supports()
            grad = torch.randn(2, n, dtype=torch.float64).masked_fill_(~s, 0)
            sup.record(grad, s)
            out = rule(func, ([grad, torch.randn(2, n, dtype=torch.float64)], 1), {}, sup)
            got = sup.of(out)
            sups.append(torch.ones(out.shape, dtype=torch.bool) if got is None else got)
        assert torch.equal(*sups), func


def test_a_shared_support_is_copied_before_either_tensor_changes_it():
    """An elementwise output shares its factor's mask (no copy); a later write to either tensor's support (an
    in-place op on a view) leaves the other's as it was."""
    from gradwise._strong_zeros._supports import _Supports

    rows = torch.tensor([True, False, True])[:, None].expand(3, 4)
    for written in (0, 1):
        sup = _Supports()
        a, b = torch.zeros(3, 4), torch.zeros(3, 4)
        sup.record(a, rows)
        sup.record(b, sup.of(a), like=a)
        assert sup.of(b).data_ptr() == sup.of(a).data_ptr()  # shared, not copied
        target, other = (a, b) if written == 0 else (b, a)
        sup.record(target[1], torch.ones(4, dtype=torch.bool))
        assert torch.equal(sup.of(target), torch.ones(3, 4, dtype=torch.bool))
        assert torch.equal(sup.of(other), rows)
        sup.record(other, None)  # a full support written over the whole storage
        assert sup.of(other) is None or sup.of(other).all()
        assert torch.equal(sup.of(target), torch.ones(3, 4, dtype=torch.bool))


def test_moving_ops_with_out_arguments_leave_the_supports_alone():
    """cat(..., out=buf) under the mode: the support is counted on copies (writing it through out= would write
    into another tensor's mask), and buf gets the pieces' supports."""
    from gradwise._strong_zeros._rules_pointwise import _moved
    from gradwise._strong_zeros._supports import _Supports

    sup = _Supports()
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    rows = torch.tensor([True, False])[:, None].expand(2, 3)
    sup.record(a, rows)
    buf = torch.empty(4, 3)
    out = _moved(aten.cat.out, ([a, b],), {"out": buf}, sup)
    assert out is buf and torch.equal(sup.of(a), rows)
    assert torch.equal(sup.of(buf), torch.tensor([True, False, True, True])[:, None].expand(4, 3))


def test_support_of_an_expanded_view():
    """An expanded tensor (a sensitivity broadcast back by sum's backward) stores each element once: its support
    is recorded there, True where any of the element's copies may be nonzero (copy_ into the overlapping view
    raised, and the trace's rerun of such an op lost its provenance)."""
    from gradwise._strong_zeros._supports import _Supports

    base = torch.randn(1, 4)
    t = base.expand(3, 4)
    support = torch.zeros(3, 4, dtype=torch.bool)
    support[2, 1] = True
    sup = _Supports()
    sup.record(t, support)
    assert torch.equal(sup.of(t), torch.tensor([[False, True, False, False]]).expand(3, 4))
    assert torch.equal(sup.of(base), torch.tensor([[False, True, False, False]]))
    sup.record(t, None)  # every element may be nonzero again
    assert sup.of(base).all()


def _padded_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (6 x 5, rows 4-5 NaN padding), the same x with finite padding, and a 5 x 3 weight: float64, seeded."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    clean = x.clone()
    clean[4:] = 0.3
    x[4:] = math.nan
    return x, clean, torch.randn(5, 3, dtype=torch.float64)


@pytest.mark.parametrize("hook", ["clamp", "nan_to_num", "tanh", "sign", "add_0", "clamp_"])
def test_a_gradient_hook_keeps_structural_zeros(hook):
    """A tensor hook that clips or cleans the gradient with an elementwise op gradwise has no rule for: a
    structural zero stays one where the op maps +-0 to 0 (``_mode._zero_preserved``), so the padding's NaN does
    not come back (it did: the op's output counted as fully supported)."""
    fn = {"clamp": lambda g: g.clamp(-1, 1), "nan_to_num": lambda g: g.nan_to_num(), "tanh": torch.tanh,
          "sign": torch.sign, "add_0": lambda g: g + 0, "clamp_": lambda g: g.clone().clamp_(-0.5, 0.5)}[hook]
    x, clean, w0 = _padded_rows()

    def grad(data, backward):
        w = w0.clone().requires_grad_()
        h = data @ w
        h.register_hook(fn)
        return backward(torch.tanh(h)[:4].sum(), w)[0]

    expected = grad(clean, torch.autograd.grad)
    got = grad(x, gw.grad)
    assert torch.equal(got, expected)
    assert grad(x, torch.autograd.grad).isnan().any()  # plain PyTorch keeps the padding's NaN


@pytest.mark.parametrize("form", ["addcmul", "addcmul value", "addcmul_"])
def test_a_multiply_add_annihilates_a_product_with_a_structural_zero(form):
    """addcmul(c, a, b) = c + a * b with a a sensitivity's structural zero and b NaN there: the product is a
    structural zero, the output c's. addcmul had no eager rule (only the compiled pass's fma kind): from torch
    2.14 group norm's decomposed backward runs ``addcmul(-ds, db, mean)``, and a sample dropped from the loss
    with NaN data kept its NaN in the norm's weight gradient, with an OpaqueBackwardWarning. Here the same op in a
    hook: h is NaN on the padding rows, the gradient a structural zero there."""
    fn = {"addcmul": lambda g, h: torch.addcmul(g, g, h), "addcmul value": lambda g, h: g.addcmul(g, h, value=0.5),
          "addcmul_": lambda g, h: g.clone().addcmul_(g, h)}[form]
    x, clean, w0 = _padded_rows()

    def grad(data, backward, op):
        w = w0.clone().requires_grad_()
        h = data @ w
        h.register_hook(lambda g: op(g, h.detach()))
        return backward(torch.tanh(h)[:4].sum(), w)[0]

    expected = grad(clean, torch.autograd.grad, fn)
    assert grad(x, torch.autograd.grad, fn).isnan().any()  # plain PyTorch keeps the padding's NaN
    assert torch.equal(grad(x, gw.grad, fn), expected)
    # the control: a product of values (ones * h) uses the padding's NaN, which stays
    assert grad(x, gw.grad, lambda g, h: torch.addcmul(g, torch.ones_like(g), h)).isnan().any()


@pytest.mark.parametrize("op", [torch.fmax, torch.fmin])
@pytest.mark.parametrize("shapes", ["elementwise", "broadcast"])
def test_fmax_and_fmin_leave_a_nan_operand_they_ignore_without_gradient(op, shapes):
    """fmax(NaN, b) = b (numpy's NaN-ignoring max): the NaN operand is unused, its gradient a structural zero.
    torch 2.13's formula fills it (``other.isnan()``); 2.14's ``masked_fill(self < other, 0)`` passes it the whole
    gradient, so the NaN of log(-1)/sqrt(-1) below stayed in the strong-zero pass, silently. Reference: plain
    PyTorch on the program with those NaN operands' inputs detached (deleted)."""
    f64 = torch.float64
    if shapes == "elementwise":  # a lone NaN on either side, never both at one element (a used NaN)
        u0, x0 = torch.tensor([-1., 2., .5, 3., 1.5], dtype=f64), torch.tensor([4., -1., .25, 9., -2.], dtype=f64)
    else:  # a's NaN row meets every column of b
        u0, x0 = torch.tensor([[-1.], [2.], [.5]], dtype=f64), torch.tensor([[4., .25, 9., 1.]], dtype=f64)

    def grads(backward, delete):
        leaves = u, x = u0.clone().requires_grad_(), x0.clone().requires_grad_()
        if delete:
            u, x = (torch.where(t0 < 0, t.detach(), t) for t0, t in ((u0, u), (x0, x)))
        return backward((op(u.log(), x.sqrt()) * torch.arange(1., 6., dtype=f64)[:x0.shape[-1]]).sum(), leaves)

    expected = grads(torch.autograd.grad, True)
    got = grads(gw.grad, False)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)


def test_an_elementwise_op_that_moves_zero_makes_values():
    """clamp(g, 0.5, 1) maps a structural zero to 0.5: a value the program uses, supported from then on."""
    from gradwise._strong_zeros._mode import _zero_preserved
    from gradwise._strong_zeros._supports import _Supports

    sup = _Supports()
    g = torch.tensor([0.0, 2.0, 0.0])
    sup.record(g, torch.tensor([False, True, True]))
    assert _zero_preserved(torch.ops.aten.clamp.default, (g, 0.5, 1.0), {}, g.clamp(0.5, 1.0), sup).all()
    kept = _zero_preserved(torch.ops.aten.clamp.default, (g, -1.0, 1.0), {}, g.clamp(-1.0, 1.0), sup)
    assert kept.tolist() == [False, True, True]
    # a tensor argument besides the sensitivity could add a value: not this rule's
    assert _zero_preserved(torch.ops.aten.clamp.Tensor, (g, torch.zeros(3), None), {}, g, sup) is None


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_with_the_selection_after_it(reentrant):
    """A reentrant checkpoint runs its block's backward as a nested torch.autograd.backward seeded with the
    outer pass's sensitivities: seeds holding structural zeros (the padding rows sliced away after the block)
    keep them there, as part of the same pass (it was planned afresh, the seeds taken as values: NaN)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh()).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    clean = x.clone()
    clean[4:] = 0.3
    x[4:] = math.nan

    def weight_grad(data, backward):
        block.zero_grad(set_to_none=True)
        y = checkpoint(block, data.clone().requires_grad_(), use_reentrant=reentrant)
        backward(y[:4].pow(2).sum())
        return block[0].weight.grad

    expected = weight_grad(clean, torch.autograd.backward)
    assert torch.allclose(weight_grad(x, gw.backward), expected, rtol=0, atol=1e-15)
    assert weight_grad(x, torch.autograd.backward).isnan().any()


class _CheckpointedBlock(torch.nn.Module):
    """qkv projection, causal attention, a channel permutation (index_select), under a non-reentrant
    checkpoint whose recomputation context can be entered once (as FSDP2's can): counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)
        self.perm = torch.tensor([2, 0, 3, 1])
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, 4)).transpose(1, 3).unbind(2)  # (batch, 1 head, steps, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return torch.tanh(out).index_select(-1, self.perm)


def test_checkpoint_saved_values_are_not_unpacked_by_the_plan():
    """Facts the plan reads from saved values (causal attention's q/k shapes, an index_select's index) are
    packed by a non-reentrant checkpoint: reading them crashed ('_Holder' object has no attribute 'dim') or
    ran the block's forward once more before the backward, whose own recomputation then failed where the
    checkpoint's context cannot be entered twice. Such facts now assume the worst; gradients are the clean
    program's (the NaN sequence deleted) and, on finite data, PyTorch's bits."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    @contextlib.contextmanager
    def once():
        yield

    torch.manual_seed(0)
    block = _CheckpointedBlock().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)

    def grads(data, grad):
        block.calls = 0
        y = checkpoint(block, data, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), once()))
        out = grad(y[:2].sum(), list(block.parameters()))
        assert block.calls == 2  # the forward and one recomputation, as in PyTorch
        return out

    for got, expected in zip(grads(x, gw.grad), grads(x, torch.autograd.grad), strict=True):
        assert torch.equal(got, expected)
    padded = x.clone()
    padded[2] = math.nan  # a sequence the loss never reads
    for got, expected in zip(grads(padded, gw.grad), grads(x[:2], torch.autograd.grad), strict=True):
        assert torch.allclose(got, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_grid_sample_leaves_unsampled_pixels_alone(mode, padding_mode):
    """grid_sample reading only the top rows of a map whose bottom rows are NaN padding: those pixels are in no
    footprint, so their gradient is a structural zero and the convolution below gets no NaN (the input gradient
    was fully supported: NaN weight gradient). Equal to the program on finite padding."""
    torch.manual_seed(0)
    img = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    k0 = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    grid = torch.rand(1, 3, 3, 2, dtype=torch.float64) * torch.tensor([2.0, 0.9], dtype=torch.float64) - 1
    clean = img.clone()
    clean[..., 5:, :] = 0.3
    img[..., 5:, :] = math.nan

    def grad(x, fn):
        k = k0.clone().requires_grad_()
        out = F.grid_sample(F.conv2d(x, k), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
        return fn(out.pow(2).sum(), k)[0]

    assert torch.equal(grad(img, gw.grad), grad(clean, torch.autograd.grad))
    assert grad(img, torch.autograd.grad).isnan().all()
    img[..., :5, :] = math.nan  # the rows the samples read: genuine
    assert grad(img, gw.grad).isnan().any()


class _NumpyMatmul(torch.autograd.Function):
    """a @ b with a backward in NumPy (a wrapped external kernel): opaque to the rules."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, _ = ctx.saved_tensors
        return None, torch.from_numpy(a.numpy().T @ g.numpy())


class _TorchMatmul(_NumpyMatmul):
    @staticmethod
    def backward(ctx, g):
        a, _ = ctx.saved_tensors
        return None, a.t() @ g


@pytest.mark.parametrize("fn", [_NumpyMatmul, _TorchMatmul], ids=["numpy", "torch"])
def test_a_custom_backward_outside_torch_ops_is_named(fn):
    """A custom Function's backward in NumPy hides the structural zeros that reach it: the NaN stays, named by an
    OpaqueBackwardWarning (it was silent). Written with torch ops, the rules follow it: exact, no warning."""
    x, clean, w0 = _padded_rows()

    def grad(data, backward):
        w = w0.clone().requires_grad_()
        return backward(torch.tanh(fn.apply(data, w))[:4].sum(), w)[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = grad(x, gw.grad)
    named = [w for w in caught if issubclass(w.category, gw.OpaqueBackwardWarning)]
    if fn is _NumpyMatmul:
        assert got.isnan().any() and named and "_NumpyMatmul" in str(named[0].message)
    else:
        assert not named and torch.equal(got, grad(clean, torch.autograd.grad))


def test_an_op_without_a_rule_that_loses_zeros_is_named():
    """A custom backward whose op has no rule (a torch.library op of a test namespace) hides the zeros from the rules
    below: the NaN comes back in the matmul's backward, and the warning names the op. (In a tensor hook the same op
    no longer does: a hook's result is structural where it was given a structural zero and returned 0, _hooks.)"""
    lib = torch.library.Library("gwtest_opaque", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda t: t * 2, "CompositeExplicitAutograd")
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    x[4:] = math.nan
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            return torch.ops.gwtest_opaque.twice(g)

    h = Twice.apply(x @ w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (got,) = gw.grad(torch.tanh(h)[:4].sum(), w)
    named = [w for w in caught if issubclass(w.category, gw.OpaqueBackwardWarning)]
    assert got.isnan().any() and named and "gwtest_opaque.twice" in str(named[0].message)
    h = x @ w
    h.register_hook(lambda g: torch.ops.gwtest_opaque.twice(g))
    (got,) = gw.grad(torch.tanh(h)[:4].sum(), w)
    (want,) = torch.autograd.grad(torch.tanh(x[:4] @ w).sum() * 2, w)  # (the hook doubles; padding deleted)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["sqrt_", "rsqrt_", "acos_"])
def test_an_in_place_op_through_a_view(op):
    """y[:2].sqrt_() runs sqrt's backward inside a CopySlices node, which shows none of its saved values: where a
    structural zero reaches it (y[0] never used), the backward runs under the mode and the NaN sqrt made at
    w[0] = -1 is annihilated (it was planned plain: NaN). On finite data: PyTorch's gradient, bitwise."""
    def loss(w):
        y = w * 1
        getattr(y[:2], op)()
        return y[1:].sum()

    w = torch.tensor([-2.0, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    clean = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    (got,) = gw.grad(loss(w), w)
    (want,) = torch.autograd.grad(loss(clean), clean)
    assert torch.equal(got, want) and got[0] == 0
    assert torch.autograd.grad(loss(w), w)[0].isnan().any()
    assert torch.equal(gw.grad(loss(clean), clean)[0], want)


@pytest.mark.parametrize("nan_in", ["per_sample_weight", "embedding_row"])
def test_embedding_bag_per_sample_weights_of_a_discarded_bag(nan_in):
    """embedding_bag(mode='sum', per_sample_weights) whose bag 2 the loss slices away. A NaN weight of that bag
    met 0 on an embedding row a kept bag shares (row 0's gradient NaN); a NaN embedding row read only by that bag
    met 0 in its weight's gradient. Reference: the program without bag 2."""
    torch.manual_seed(0)
    emb = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    inp, off = torch.tensor([1, 2, 0, 4, 0, 3, 5, 0]), torch.tensor([0, 3, 5])  # bags [1,2,0] [4,0] [3,5,0]
    psw = torch.rand(8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        if nan_in == "per_sample_weight":
            psw[7] = float("nan")
        else:
            emb[5] = float("nan")
    loss = F.embedding_bag(inp, emb, off, mode="sum", per_sample_weights=psw)[:2].pow(2).sum()
    got = gw.grad(loss, [emb, psw])
    ref = torch.autograd.grad(F.embedding_bag(inp[:5], emb, off[:2], mode="sum", per_sample_weights=psw[:5])
                              .pow(2).sum(), [emb, psw])
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    assert got[1][:5].equal(ref[1][:5]) and bool((got[1][5:] == 0).all())


@pytest.mark.parametrize("reduce", ["amax", "amin", "max", "min"])
def test_an_infinite_sensitivity_meets_a_reductions_unselected_zeros(reduce):
    """(w.amax(-1) * inf).sum(): amax's backward multiplies the incoming sensitivity (inf, made above it from a
    finite saved value) by its mask of the selected elements; the unselected elements are values the output never
    uses (deleted, the gradient there is 0), and the strong-zero rule annihilates inf x 0 there. gw.grad's plan read
    only what a structural zero reaches from above, saw nothing non-finite and ran plain: NaN (found by the trace's
    agreement fuzzer)."""
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]], requires_grad=True)
    op = {"amax": lambda t: t.amax(-1), "amin": lambda t: t.amin(-1), "max": torch.max, "min": torch.min}[reduce]
    got = gw.grad((op(w) * math.inf).sum(), w)[0]
    with gw.strong_zeros():  # the rules themselves, whatever the plan
        y = (op(w) * math.inf).sum()
        ruled = torch.autograd.grad(y, w, grad_outputs=torch.ones_like(y))[0]
    torch.testing.assert_close(got, ruled, equal_nan=True)
    assert not got.isnan().any()
    pick = w.detach().flatten() if reduce in ("max", "min") else w.detach()
    chosen = (pick == op(w).detach().unsqueeze(-1) if reduce in ("amax", "amin") else pick == op(w).detach())
    assert (got.flatten()[~chosen.flatten()] == 0).all()
    assert got.flatten()[chosen.flatten()].isinf().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(10, 64, 512), (3, 70000), (1, 300000), (7,), ()])
def test_annihilation_is_where_bit_for_bit_with_a_bounded_temporary(dtype, shape):
    """The rules' annihilation (a product's unsupported elements set to 0 whatever they hold) multiplies the bits as
    integers by the mask on CPU, in slices of dim 0 where the tensor is large: the same bits as where(support, out,
    0) (NaN, Inf and -0.0 kept or cleared alike; broadcast supports), and the multiply's temporary (the mask cast
    to integers) stays bounded instead of growing with the gradient (it held a whole gradient's size before)."""
    from gradwise._strong_zeros._rules import _CHUNK, _annihilate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    x[x > 1] = nan
    x[x < -1.5] = inf
    x[(x > 0.5) & (x < 0.6)] = -0.0
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    for support_shape in (shape, shape[:1] + (1,) * (len(shape) - 1)):
        support = torch.rand(support_shape, generator=gen) > 0.3
        expected = torch.where(support, x, x.new_zeros(()))
        got = x.clone()
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
            _annihilate(got, support.expand(shape))
        assert torch.equal(got.view(bits), expected.view(bits))
        total = peak = 0
        for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                           if e.name() == "[memory]"):
            total += n
            peak = max(peak, total)
        assert peak <= _CHUNK * x.element_size()
