"""Strong zeros under torch.compile for constructs a review tried one by one (issue #12's review): references are
the same compiled function's plain PyTorch gradient on finite data (bitwise) and, with NaN padding, the program
with the padding deleted (plain eager PyTorch, float64). Kept to a few small graphs: compiling is slow on CI."""

from __future__ import annotations

import pytest
import torch

import _compiling  # noqa: F401 (inductor imported quietly)
import gradwise as gw

nan = float("nan")


@pytest.fixture(scope="module", autouse=True)
def _fresh_compiles():
    """No backward from AOTAutograd's on-disk cache (those take the op-by-op path, tested in test_compile.py)."""
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _grads(fn, x, k, params, strong):
    for p in params:
        p.grad = None
    if strong:
        with gw.strong_zeros():
            fn(x, k).backward()
    else:
        fn(x, k).backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize(("dynamic", "cols"), [(False, False), (True, False), (False, True)],
                         ids=["static", "dynamic", "rows-and-columns"])
def test_a_tail_slice_before_tanh_is_bitwise_on_finite_data(dynamic, cols):
    """``tanh(lin(x))[n - k:]`` (a tail slice: the start > 0, as in ``labels[:, 1:]``; and ``[n - k:, 1:]``). The
    pass's support of the slice's backward was a bool ``slice_scatter``, which inductor's CPU vectorizer does not
    vectorize: the fused kernel ran scalar ``std::tanh`` where PyTorch's compile runs the vectorized tanh, and the
    finite gradients differed from compiled PyTorch's in the last bits (up to 4.4e-16 here). The window is now
    index comparisons."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()
    params = list(lin.parameters())

    def loss(x, k):
        h = torch.tanh(lin(x))[x.shape[0] - k:]
        return (h[:, 1:] if cols else h).square().sum()

    compiled = torch.compile(loss, dynamic=dynamic)
    shapes = [(6, 4), (8, 3)] if dynamic else [(6, 4)]
    for n, k in shapes:
        x = torch.randn(n, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        plain = _grads(compiled, x, k, params, strong=False)
        strong = _grads(compiled, x, k, params, strong=True)
        for s, p in zip(strong, plain, strict=True):
            assert torch.equal(s, p)
        # NaN in the rows the loss never reads: the program with them deleted
        bad = x.clone()
        bad[: n - k] = nan
        got = _grads(compiled, bad, k, params, strong=True)
        want = _grads(loss, x[n - k:], k, params, strong=False)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
