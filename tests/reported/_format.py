"""What the reported case files share: the two formats of ../shared/cases (contamination.py, nonsmooth.py), and
the helpers the nonsmooth rounds build their data with (autograd at points pushed into each piece).

The case files are loaded by path (``check.py --cases FILE``, ``check_nonsmooth.py --cases FILE``, the tests), so
each puts its own folder on ``sys.path`` before importing this module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls


@dataclass(frozen=True)
class Case:
    """A contamination case: ``build()`` returns (output, inputs, expected gradients)."""

    name: str
    source: str
    build: Callable[[], tuple]
    genuine: bool = False


def contamination_table() -> tuple[list[Case], Callable]:
    """A case list and the ``@case(name, source, genuine=False)`` decorator that fills it."""
    cases: list[Case] = []

    def case(name: str, source: str, genuine: bool = False):
        def register(build):
            cases.append(Case(name, source, build, genuine))
            return build

        return register

    return cases, case


def leaf(t: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    return t.detach().to(dtype).clone().requires_grad_(True)


def ref(fn, *inputs, dtype=torch.float64) -> tuple:
    """Gradient of ``fn`` (the program with the unused values deleted) at float64 copies of ``inputs``."""
    leaves = [leaf(t, dtype) for t in inputs]
    grads = torch.autograd.grad(fn(*leaves), leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=False))


@dataclass(frozen=True)
class NonsmoothCase:
    """A function at a kink with its exact one-sided derivatives, subdifferential vertices and stationarity."""

    name: str
    source: str
    f: Callable
    inputs: Callable[[], tuple]  # builds fresh input tensors (requires_grad=True)
    directions: list = field(default_factory=list)
    vertices: list | None = None
    stationary: bool | None = None
    min_norm: float | None = None


D = torch.float64


def t(v, dtype=D):
    return torch.tensor(v, dtype=dtype)


def leaves(*vals, dtype=D):
    return lambda: tuple(t(v, dtype).requires_grad_(True) for v in vals)


def _grad_at(f, xs):
    xs = [x.detach().to(D).requires_grad_(True) for x in xs]
    out = f(*xs)
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return torch.cat([(torch.zeros_like(x) if g is None else g).reshape(-1) for x, g in zip(xs, gs, strict=False)])


def pushed_dd(f, inputs, d, eps=1e-8):
    """<grad f(x + eps d), d>: the directional derivative of the piece active along d."""
    x0 = [x.detach().to(D) for x in inputs()]
    g = _grad_at(f, [x + eps * t(di).reshape(x.shape) for x, di in zip(x0, d, strict=False)])
    return float(g @ torch.cat([t(di).reshape(-1) for di in d]))


def dirs(f, inputs, ds):
    """[(direction tensors, f'(x; d))] with f'(x; d) from `pushed_dd`."""
    x0 = inputs()
    return [(tuple(t(di).reshape(x.shape) for x, di in zip(x0, d, strict=False)), round(pushed_dd(f, inputs, d), 9))
            for d in ds]


def pieces(f, inputs, pushes=(), n_random=300, eps=1e-7, seed=1):
    """Gradients of the pieces active at x: autograd at x + eps * push, for the given and random pushes."""
    x0 = [x.detach().to(D) for x in inputs()]
    gen = torch.Generator().manual_seed(seed)
    all_pushes = [[t(p).reshape(x.shape) for x, p in zip(x0, push, strict=False)] for push in pushes]
    all_pushes += [[torch.randn(x.shape, generator=gen, dtype=D) for x in x0] for _ in range(n_random)]
    found = []
    for push in all_pushes:
        g = _grad_at(f, [x + eps * p for x, p in zip(x0, push, strict=False)])
        if all(float((g - v).abs().max()) > 1e-5 for v in found):
            found.append(g)
    return [[round(float(a), 7) for a in v] for v in found]


def min_norm(verts):
    """The norm of the least-norm point of the vertices' hull (NNLS)."""
    g = np.array(verts, dtype=float)
    a = np.vstack([g.T, np.ones((1, len(g)))])
    b = np.zeros(a.shape[0])
    b[-1] = 1.0
    mu, _ = nnls(a, b, maxiter=5000)
    v = float(np.linalg.norm((mu / mu.sum()) @ g))
    return 0.0 if v < 1e-9 else v


def nonsmooth_table() -> tuple[list[NonsmoothCase], Callable]:
    """A case list and ``add(name, source, f, inputs, directions, ...)``, which fills in the derivatives along the
    directions, the vertices, the least norm and stationarity ("auto") from `pushed_dd`, `pieces` and `min_norm`."""
    cases: list[NonsmoothCase] = []

    def add(name, source, f, inputs, ds, pushes=(), n_random=300, vertices="auto", stationary="auto", mn="auto"):
        verts = pieces(f, inputs, pushes, n_random) if vertices == "auto" else vertices
        m = (min_norm(verts) if verts is not None else None) if mn == "auto" else mn
        st = (m is not None and m <= 1e-9) if stationary == "auto" else stationary
        cases.append(NonsmoothCase(name, source, f, inputs, dirs(f, inputs, ds), verts, st, m))

    return cases, add
