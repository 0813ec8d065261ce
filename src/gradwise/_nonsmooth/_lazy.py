"""``LazyTangent``: a forward-mode tangent computed only where a kink rule reads it (``at``), or in full on any other
use; ``lazy_tangents`` (the passes that may make them), ``Stale``, ``take`` and the lazy forms of the conv2d, relu
and max-pool tangents.

Why. In `_engine._raw_locked_grad`'s passes the tangents are dropped after the last tie, so a tangent is read only
by the kink rules that rank ties. A max-pool with a few hundred tied windows reads its input's tangent at a few
thousand elements, yet the tangent of the convolution before it costs two full convolutions. Those passes make
conv2d's tangent lazy; relu and max-pool pass laziness on (element by element), and a max-pool ranks its ties from
``at(positions)``: a convolution computes it for the images (dim 0) that hold those positions, with the eager
rule's own code on that sub-batch.

Soundness. A ``LazyTangent`` is a real tangent of a dual tensor (a ``__torch_dispatch__`` wrapper): every op
other than those above (PyTorch's forward-mode formulas, a custom Function's ``jvp``, a rule reading it) sees
the full tangent, computed by exactly the code that computed it eagerly (bitwise the same). A sub-batch goes
through the same kernels (a convolution's may round differently for a batch of another size; gradwise pads a
batch of one to two, where some kernels switch algorithms). A tensor the tangent reads that is modified in place
before the tangent is computed raises ``Stale``: the engine reruns the pass without lazy tangents.

May import: torch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

Tensor = torch.Tensor
aten = torch.ops.aten


class _Active(threading.local):
    """Whether the current pass may make lazy tangents (`lazy_tangents`): a stack, for gradwise inside f."""

    def __init__(self):
        self.stack = [False]


_ACTIVE = _Active()

# `at` computes a lazy tangent in full (then indexes it) when asked for more than 1/_SPARSE_RATIO of its elements
# (finding their batch elements would cost more than it could save), or for elements in more than half of its
# batch (dim 0)
_SPARSE_RATIO = 4


class Stale(Exception):
    """A tensor a lazy tangent reads was modified in place before the tangent was computed."""


@contextlib.contextmanager
def lazy_tangents(on: bool):
    """Let the rules in this pass make lazy tangents (``on``) or not."""
    _ACTIVE.stack.append(on)
    try:
        yield
    finally:
        _ACTIVE.stack.pop()


def active() -> bool:
    return _ACTIVE.stack[-1]


class LazyTangent(Tensor):
    """A tangent shaped like ``like`` (dim 0 a batch) whose values are ``dense()`` (computed once, on first use) or,
    for some batch elements, ``batch(index)`` (the same kernels on a sub-batch). ``watched``: the tensors both
    read, which must keep their version until then."""

    @staticmethod
    def __new__(cls, like: Tensor, dense: Callable[[], Tensor], batch: Callable[[Tensor], Tensor],
                watched: tuple[Tensor | None, ...], at: Callable[[Tensor], Tensor] | None = None):
        t = Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                          device=like.device, requires_grad=False)
        t._dense_fn, t._batch_fn, t._at_fn, t._full, t.where_positive = dense, batch, at, None, None
        t._watched = tuple((w, w._version) for w in watched if w is not None)
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def _check(self) -> None:
        if any(w._version != v for w, v in self._watched):
            raise Stale

    def computed(self) -> bool:
        """Whether the full tangent has been computed (reads then index it)."""
        return self._full is not None

    def dense(self) -> Tensor:
        """The full tangent, computed as the eager rule computes it."""
        if self._full is None:
            self._check()
            with torch._C.DisableTorchFunction(), torch.no_grad():  # (the kink mode must not count these calls)
                self._full = self._dense_fn()
            self._batch_fn = self._dense_fn = self._at_fn = self._watched = None  # (nothing more to compute)
        return self._full

    def batch(self, index: Tensor) -> Tensor:
        """The tangent of the batch elements ``index`` (sorted, distinct): ``dense()[index]``."""
        if self._full is not None:
            return self._full.index_select(0, index)
        self._check()
        with torch._C.DisableTorchFunction(), torch.no_grad():
            return self._batch_fn(index)

    def at(self, flat: Tensor) -> Tensor:
        """The tangent's elements at row-major flat positions ``flat`` (1-D int64): element by element from its
        source's (``at`` given), or from the batch elements that hold them, unless they are many."""
        if self._full is None and self._at_fn is not None:
            self._check()
            with torch._C.DisableTorchFunction(), torch.no_grad():
                return self._at_fn(flat)
        n, size = self.shape[0] if self.dim() else 1, self.numel()
        if self._full is None and flat.numel() * _SPARSE_RATIO <= size and n > 1:
            per = size // n
            row = flat.div(per, rounding_mode="floor")
            index = torch.zeros(n, dtype=torch.bool, device=flat.device).index_fill_(0, row, True).nonzero()[:, 0]
            if 2 * index.numel() <= n:
                local = torch.full((n,), -1, dtype=flat.dtype, device=flat.device)
                local[index] = torch.arange(index.numel(), device=flat.device)
                return self.batch(index).reshape(-1).index_select(0, local[row].mul_(per).add_(flat - row * per))
        return self.dense().reshape(-1).index_select(0, flat)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is aten.is_same_size.default:  # forward AD's checks in make_dual read only the metadata
            return args[0].shape == args[1].shape
        if func is aten._has_same_storage_numel.default:
            return _storage_numel(args[0]) == _storage_numel(args[1])
        full = lambda a: a.dense() if isinstance(a, LazyTangent) else a
        return func(*tree_map(full, args), **tree_map(full, kwargs or {}))


def _storage_numel(t: Tensor) -> int:
    """The elements of t's storage; for a lazy tangent, of the storage its strides span."""
    if not isinstance(t, LazyTangent):
        return t.untyped_storage().nbytes() // t.element_size()
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0


def take(t: Tensor, flat: Tensor) -> Tensor:
    """``t.reshape(-1)[flat]`` (``flat`` any shape), from a lazy tangent's needed elements only."""
    if isinstance(t, LazyTangent):
        return t.at(flat.reshape(-1)).view(flat.shape)
    return t.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape)


# --- lazy forms of the tangent rules ---------------------------------------------------------------------------


def conv2d_tangent(out: Tensor, xp: Tensor, xt: Tensor | None, dense: Callable,
                   reads: tuple[Tensor | None, ...] = ()) -> Tensor | None:
    """A batched conv2d's tangent as a `LazyTangent`: ``dense(xp, xt)`` is the eager rule's conv(x', W) + conv(x, W')
    + b' (for a sub-batch of x and x' too), which also ``reads`` (W, W', b'); None where the call is not batched
    2-D."""
    if xp.dim() != 4 or out.dim() != 4 or xp.shape[0] != out.shape[0]:
        return None
    xp = xp.detach()

    def batch(index: Tensor) -> Tensor:
        # (one image is padded with a second: convolution kernels may take another path for a batch of one)
        two = index if index.numel() > 1 else torch.cat([index, (index + 1) % xp.shape[0]])
        sub = lambda t: None if t is None else t.batch(two) if isinstance(t, LazyTangent) else t.index_select(0, two)
        return dense(sub(xp), sub(xt))[: index.numel()]

    return LazyTangent(out, lambda: dense(xp, xt.dense() if isinstance(xt, LazyTangent) else xt), batch,
                       (xp, None if isinstance(xt, LazyTangent) else xt, *reads))


def relu_tangent(xt: Tensor, out: Tensor) -> Tensor:
    """relu's tangent x' where relu(x) > 0 (``threshold_backward``) of a lazy x', itself lazy; its
    ``where_positive`` is x' (the same elements wherever relu(x) > 0: a max-pool reads them from x' at windows
    whose maximum is > 0)."""
    out = out.detach()
    t = LazyTangent(out, lambda: aten.threshold_backward(xt.dense(), out, 0.0),
                    lambda index: aten.threshold_backward(xt.batch(index), out.index_select(0, index), 0.0), (out,),
                    lambda flat: aten.threshold_backward(xt.at(flat), out.reshape(-1).index_select(0, flat), 0.0))
    t.where_positive = xt
    return t


def gathered_tangent(xt: Tensor, lock: Tensor, out: Tensor, planes: int) -> tuple[Tensor, Callable[[], None]]:
    """A max-pool's output tangent, x' at the (per plane, flat) ``lock`` indices, of a lazy x' (``planes``: the
    pooled planes, dim 0 a batch of them), and ``keep``: the rule calls it before it writes another choice into
    ``lock`` (the ranked pass writes the first pass's after that pass), which keeps this pass's indices."""
    held = [lock]
    n_out, n_in = lock.numel() // max(planes, 1), xt.numel() // max(planes, 1)  # (elements per plane)

    def at(flat: Tensor) -> Tensor:  # x' at the plane's offset + the lock
        offset = held[0].reshape(-1).index_select(0, flat)
        return xt.at(flat.div(n_out, rounding_mode="floor").mul_(n_in).add_(offset))

    def batch(index: Tensor) -> Tensor:
        per = lock.numel() // max(lock.shape[0], 1)
        flat = (index.view(-1, 1) * per + torch.arange(per, device=index.device)).reshape(-1)
        return at(flat).view(index.numel(), *lock.shape[1:])

    def keep() -> None:
        if not tangent.computed() and held[0] is lock:
            held[0] = lock.clone()

    tangent = LazyTangent(out, lambda: xt.dense().reshape(planes, -1).gather(1, held[0].reshape(planes, -1))
                          .reshape(lock.shape), batch, (), at)
    return tangent, keep
