"""gradwise on a CUDA device: the fused attention kernels PyTorch picks there, the trace's batched checks, the
torch.compile pass with Triton kernels.

CI has no GPU, so every test here skips with that reason; they run where a GPU is lent (the closing notes say
when and what they gave). References are independent of gradwise: the same kernel on the same program with the
unused values deleted or replaced by finite ones (their gradient is the same, since the loss never reads them).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import _compiling  # noqa: F401 (inductor imported quietly)
import gradwise as gw
from gradwise import CompiledBackwardWarning
from gradwise._strong_zeros._mode import _StrongZeroMode
from gradwise._strong_zeros._node_facts import MAKES_NO_ZEROS, NODE_FACTS, _makes_zeros

# the compile pass is written against torch 2.13's AOTAutograd (src/gradwise/_strong_zeros/_compile.py); on the
# CUDA machines' torch 2.11 it did not reach the compiled backward's graph (2026-12-04: the warning, no NaN kept
# silently)
_PASS_REACHES_AOT = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")

nan = float("nan")
cuda = torch.device("cuda")

# backend -> the dtypes it runs (flash and cuDNN need half precision)
BACKENDS = {
    SDPBackend.FLASH_ATTENTION: (torch.float16, torch.bfloat16),
    SDPBackend.EFFICIENT_ATTENTION: (torch.float32, torch.float16),
    SDPBackend.CUDNN_ATTENTION: (torch.float16, torch.bfloat16),
    SDPBackend.MATH: (torch.float32,),
}
CASES = [(b, d) for b, ds in BACKENDS.items() for d in ds]


def _qkv(dtype, batch=3, heads=4, kv_heads=4, steps=64, dim=64, seed=0):
    gen = torch.Generator(device=cuda).manual_seed(seed)
    return [torch.randn(batch, h, steps, dim, generator=gen, device=cuda, dtype=dtype) for h in (heads, kv_heads,
                                                                                                   kv_heads)]


def _grads(loss_of, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    return leaves, loss_of(*leaves)


def _runs(backend, dtype, **kw) -> bool:
    """Whether this device's PyTorch runs `backend` on these shapes (cuDNN attention needs a recent cuDNN)."""
    q, k, v = _qkv(dtype, **{a: b for a, b in kw.items() if a != "causal"})
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q.requires_grad_(), k, v, is_causal=kw.get("causal", False)).sum().backward()
    except RuntimeError:
        return False
    return True


def _compare(got, exp, dtype):
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    for g, e in zip(got, exp, strict=True):
        assert g.isfinite().all()
        torch.testing.assert_close(g, e, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=[f"{b.name}-{str(d)[6:]}" for b, d in CASES])
def test_padded_queries_through_each_kernel(backend, dtype, causal):
    """Right-padded sequences, the padded query rows NaN and discarded by the loss; under a causal mask the
    padded keys are NaN too (only padded queries read them). Reference: the same kernel with those NaN
    replaced by 0, which the loss never reads either."""
    if not _runs(backend, dtype, causal=causal):
        pytest.skip(f"{backend.name} does not run {dtype} here")
    lengths, steps = [40, 64, 17], 64
    pad = torch.arange(steps, device=cuda)[None, :] >= torch.tensor(lengths, device=cuda)[:, None]
    q, k, v = _qkv(dtype)
    q = q.masked_fill(pad[:, None, :, None], nan)

    def loss_of(a, b, c):
        out = F.scaled_dot_product_attention(a, b, c, is_causal=causal)
        return sum(out[i, :, :n].float().square().sum() for i, n in enumerate(lengths))

    with sdpa_kernel(backend):
        if causal and loss_of(q, nan_k := k.masked_fill(pad[:, None, :, None], nan), v).isfinite():
            k = nan_k  # this kernel skips the masked scores (the math one adds -inf to NaN: a forward NaN)
        leaves, loss = _grads(loss_of, (q, k, v))
        assert loss.isfinite()
        plain = torch.autograd.grad(loss, leaves, retain_graph=True)
        assert not all(g.isfinite().all() for g in plain), "the plain kernel should be contaminated here"
        got = gw.grad(loss, leaves)
        clean, clean_loss = _grads(loss_of, (q.nan_to_num(0.0), k.nan_to_num(0.0), v))
        exp = torch.autograd.grad(clean_loss, clean)
    _compare(got, exp, dtype)
    assert not any("attention" in op for op in gw.unruled_ops())


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=[f"{b.name}-{str(d)[6:]}" for b, d in CASES])
def test_whole_sequences_discarded_through_each_kernel(backend, dtype):
    """A fixed batch filled with all-NaN sequences, sliced away after attention (GQA where the kernel takes it)."""
    if not _runs(backend, dtype):
        pytest.skip(f"{backend.name} does not run {dtype} here")
    q, k, v = _qkv(dtype)
    for t in (q, k, v):
        t[1] = nan

    def loss_of(a, b, c):
        return F.scaled_dot_product_attention(a, b, c)[[0, 2]].float().square().sum()

    with sdpa_kernel(backend):
        leaves, loss = _grads(loss_of, (q, k, v))
        got = gw.grad(loss, leaves)
        ref, ref_loss = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c).float().square().sum(),
                               [t[[0, 2]] for t in (q, k, v)])
        exp = torch.autograd.grad(ref_loss, ref)
    for g in got:
        assert torch.equal(g[1], torch.zeros_like(g[1]))
    _compare([g[[0, 2]] for g in got], exp, dtype)


@pytest.mark.parametrize("backend", [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
def test_key_padding_mask_with_nan_padded_queries(backend):
    """A boolean key-padding mask (the kernels that take a mask), the padded query rows NaN and discarded."""
    lengths, steps = [40, 64, 17], 64
    pad = torch.arange(steps, device=cuda)[None, :] >= torch.tensor(lengths, device=cuda)[:, None]
    q, k, v = _qkv(torch.float32)
    q = q.masked_fill(pad[:, None, :, None], nan)
    mask = ~pad[:, None, None, :]

    def loss_of(a, b, c):
        out = F.scaled_dot_product_attention(a, b, c, attn_mask=mask)
        return sum(out[i, :, :n].square().sum() for i, n in enumerate(lengths))

    with sdpa_kernel(backend):
        leaves, loss = _grads(loss_of, (q, k, v))
        got = gw.grad(loss, leaves)
        clean, clean_loss = _grads(loss_of, (q.nan_to_num(0.0), k, v))
        exp = torch.autograd.grad(clean_loss, clean)
    _compare(got, exp, torch.float32)


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=[f"{b.name}-{str(d)[6:]}" for b, d in CASES])
def test_unmasked_kernels_make_no_structural_zeros(backend, dtype):
    """The path check reads no saved tensor above an unmasked attention node: its backward must make no
    structural zero (the CPU version of this check is tests/test_strong_zeros.py's, for the CPU node)."""
    if not _runs(backend, dtype):
        pytest.skip(f"{backend.name} does not run {dtype} here")
    q, k, v = (t.abs() + 0.5 for t in _qkv(dtype))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(*leaves)
    node = out.grad_fn
    assert not _makes_zeros(node), f"{type(node).__name__} counted as making zeros without a mask"
    mode = _StrongZeroMode()
    with mode:
        grads = torch.autograd.grad(out, leaves, torch.rand_like(out) + 0.5)
    assert not mode.supports._masks, f"{type(node).__name__}'s backward made a structural zero"
    assert all(g.isfinite().all() for g in grads)


def test_a_nan_the_output_uses_stays_on_cuda():
    """Control: a NaN query row the loss reads keeps NaN gradients through the default kernel."""
    q, k, v = _qkv(torch.float16)
    q[0, :, 3] = nan
    leaves, loss = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c).float().square().sum(), (q, k, v))
    assert not gw.grad(loss, leaves)[1].isfinite().all()


def _sliced_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, device=cuda)
    x = torch.randn(16, 64, device=cuda)
    x[8:] = nan
    return lin, x


def test_strong_zeros_on_a_cuda_slice():
    lin, x = _sliced_linear()
    (got,) = gw.grad(lin(x)[:8].square().sum(), [lin.weight])
    (exp,) = torch.autograd.grad(lin(x[:8]).square().sum(), [lin.weight])
    torch.testing.assert_close(got, exp)


def test_fused_rms_norm_node_facts():
    """nn.RMSNorm on CUDA is one fused op with its own node: known to the path check, making no zeros."""
    x = (torch.rand(16, 64, device=cuda) + 0.5).requires_grad_()
    norm = nn.RMSNorm(64, device=cuda)
    out = norm(x)
    name = type(out.grad_fn).__name__
    assert name in NODE_FACTS and name in MAKES_NO_ZEROS, name
    mode = _StrongZeroMode()
    with mode:
        torch.autograd.grad(out, [x, norm.weight], torch.rand_like(out) + 0.5)
    assert not mode.supports._masks


def test_fused_rms_norm_nan_rows_sliced():
    torch.manual_seed(0)
    norm = nn.RMSNorm(64, device=cuda)
    x = torch.randn(16, 64, device=cuda)
    x[8:] = nan
    (got,) = gw.grad(norm(x)[:8].square().sum(), [norm.weight])
    (exp,) = torch.autograd.grad(norm(x[:8]).square().sum(), [norm.weight])
    torch.testing.assert_close(got, exp)


@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
@pytest.mark.parametrize("inside", [False, True], ids=["compiled-outside", "compiled-inside"])
def test_compiled_slice_on_cuda(inside):
    """torch.compile's inductor on CUDA (Triton kernels): the backward pass keeps the strong zeros."""
    torch._dynamo.reset()
    lin, x = _sliced_linear()
    f = torch.compile(lambda t: lin(t)[:8].square().sum())
    (exp,) = torch.autograd.grad(lin(x[:8]).square().sum(), [lin.weight])
    # a backward from AOTAutograd's on-disk cache has no graph to rewrite (tests/test_compile.py covers that)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        if not inside:
            f(x)  # compiled before the block
        if _PASS_REACHES_AOT:
            with gw.strong_zeros() if inside else contextlib.nullcontext():
                (got,) = gw.grad(f(x), [lin.weight])
            torch.testing.assert_close(got, exp)
        else:  # gradwise cannot see inside the compiled backward: it must say so, never return NaN silently
            with pytest.warns(CompiledBackwardWarning), gw.strong_zeros() if inside else contextlib.nullcontext():
                gw.grad(f(x), [lin.weight])


def test_trace_finds_the_birth_on_cuda():
    """The trace batches its finiteness checks on accelerators: the log that made the NaN rows and the
    contamination they cause in the weight gradient are still found."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, device=cuda)
    x = torch.rand(16, 64, device=cuda) + 0.1
    x[8:] = -1.0
    with gw.trace() as report:
        lin(x.log())[:8].square().sum().backward()  # log(-1): NaN rows, sliced away after the layer
    kinds = {f.kind: f for f in report.findings}
    assert "contamination" in kinds, report.findings
    assert "log" in (kinds["contamination"].born_op or "")


def test_a_pass_on_cuda_reads_its_own_state_on_the_device_thread():
    """The engine runs CUDA nodes on its device thread, where gradwise's per-thread state had its defaults
    ("outputs finite"): exp(-inf) x inf reaching a NaN output was taken for a structural zero, the genuine NaN
    hidden. tests/test_engine_threads.py checks the same on the CPU's pool thread."""
    inf = float("inf")
    x = torch.tensor([-inf, 0.0, 1.0], device=cuda, requires_grad=True)
    with gw.strong_zeros():
        (torch.exp(x) * torch.tensor([inf, 1.0, nan], device=cuda))[:2].sum().backward()
    ref = x.detach().clone().requires_grad_()
    (torch.exp(ref[:2]) * torch.tensor([inf, 1.0], device=cuda)).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, equal_nan=True, rtol=0, atol=0)
