"""gw.watch()'s check of the gradients with one C call fewer per gradient (session 35): functorch's
``is_functorch_wrapped_tensor`` alone tells the tensors it must not read, batched ones included (a leaked
BatchedTensor summed outside its vmap raises: a crash inside the watch). References: PyTorch's own
``is_batchedtensor``, and the same tensors read without gradwise (which raise)."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw
from gradwise._trace import _kinds, _watch_leaves

_WRAPPED = "functorch-wrapped (vmap/grad transform)"


def _transformed_tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tensors met inside vmap, nested vmap, grad of vmap and vmap of grad, some holding NaN: (all of them, the
    batched ones as PyTorch tells them, read inside the transform); all are kept past it (leaked)."""
    seen, batched = [], []

    def f(x):
        y = x * float("nan")
        seen.extend((x, y))
        batched.extend(t for t in (x, y) if torch._C._functorch.is_batchedtensor(t))
        return x.sin()

    torch.vmap(f)(torch.randn(3, 2))
    torch.vmap(torch.vmap(f))(torch.randn(2, 3, 2))
    torch.func.grad(lambda x: torch.vmap(f)(x).sum())(torch.randn(3, 2))
    torch.vmap(torch.func.grad(lambda x: f(x).sum()))(torch.randn(2, 3))
    return seen, batched


def test_wrapped_covers_batched():
    """The law the check relies on: every tensor PyTorch calls batched is functorch-wrapped, inside and after its
    transform, and `_kinds` passes it over as such."""
    seen, batched = _transformed_tensors()
    assert len(batched) >= 6  # (the programs above made batched tensors at all)
    for t in batched:
        assert torch._C._functorch.is_functorch_wrapped_tensor(t)
        assert _kinds.kind(t) == _WRAPPED
    for t in seen:
        assert _kinds.kind(t) == _WRAPPED


def test_check_passes_over_leaked_batched():
    """A leaked batched or grad-wrapped tensor in the watch's check is passed over (not read), as before: reading
    it raises, and it was never known non-finite."""
    seen, batched = _transformed_tensors()
    leaked = []
    for t in seen:
        try:  # the reference: PyTorch refuses to read it
            t.sum().item()
        except RuntimeError:
            leaked.append(t)
    assert len(leaked) >= len(batched) >= 6
    plain = [torch.ones(5), torch.ones(3, 3)]
    assert _watch_leaves._finite(plain + leaked)
    assert not _watch_leaves._finite([torch.full((3, 3), float("nan")), *leaked])
    assert not _watch_leaves._finite([*leaked, torch.tensor([1.0, float("-inf")])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (7,), (5000,), (4, 3)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_check_finds_each_nonfinite(dtype, shape, bad):
    """Every branch of the check (a loss, a small vector joined with others, a large vector, a matrix; each
    dtype): one NaN/Inf element among finite gradients is found, and finite ones pass (reference: isfinite)."""
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    if bad is not None:
        g.reshape(-1)[g.numel() // 2] = bad
    grads = [torch.randn(3), g, torch.randn(2, 2)]
    assert _watch_leaves._finite(grads) == bool(torch.isfinite(g).all())


def test_watch_finds_nan_gradient_with_finite_loss():
    """The end to end case the check exists for: a finite loss whose gradient is NaN (0 * NaN weight read by a
    masked row) is found and explained at its step."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x = torch.cat((torch.ones(2, 3), torch.full((1, 3), float("nan"))))
    with gw.watch() as report:
        for _ in range(3):
            lin.zero_grad()
            lin(x[:2]).sum().backward()
        lin.zero_grad()
        loss = lin(x)[:2].sum()
        loss.backward()
    assert torch.isfinite(loss)
    assert not torch.isfinite(lin.weight.grad).all()
    assert [f.step for f in report.findings] == [3]
