"""The least norm of the Clarke subdifferential where the only kink is one Euclidean norm at 0 (``ball``).

With n = ||y(x)||_2 at y = 0 and f otherwise smooth, every piece's gradient is G(u) = a + c J^T u for a unit u
(J: y's Jacobian, c: df/dn), and the subdifferential is the ellipsoid a + Q B, Q = sqrt(c^2 J^T J), B the unit
ball. Along a direction d the norm's lock is u = J d / |J d|, so G(d) - G(-d) = 2 c K d / sqrt(d^T K d)
(K = J^T J) and G(d) + G(-d) = 2 a: n pairs of pieces along independent directions give a and
c^2 K = V diag(t) D^-1 (V the differences' halves, t_i = d_i . v_i = c sqrt(d_i^T K d_i)). The least norm of
a + Q w over |w| <= 1 is a trust-region problem solved exactly; the pieces at its minimiser (a boundary point is
the piece along sign(c) Q^+ w) join the hull, so a True is still proved by computed pieces, and the least norm
is a lower bound for False once those pieces match the model.

May import: numpy, scipy, torch, ``_engine``, ``_records``.
"""

from __future__ import annotations

import numpy as np
import torch

from gradwise._nonsmooth._engine import _locked_grad

MAX_BALL_ENTRIES = 64  # input entries for which the ellipsoid is formed (2 n + 2 reverse passes)


def _flat(t) -> torch.Tensor:
    return torch.cat([e.detach().reshape(-1).to(torch.float64).cpu() for e in t])


def _unflat(v: torch.Tensor, like) -> tuple[torch.Tensor, ...]:
    out, i = [], 0
    for e in like:
        out.append(v[i:i + e.numel()].reshape(e.shape).to(e.dtype))
        i += e.numel()
    return tuple(out)


def _trust_region(alpha: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """argmin over |w| <= 1 of sum_i (alpha_i + lam_i w_i)^2 (lam >= 0, the eigenbasis of Q)."""
    live = lam > 1e-12 * max(float(lam.max(initial=0.0)), 1e-300)
    w = np.zeros_like(alpha)
    if not live.any():
        return w
    a, l_ = alpha[live], lam[live]
    free = -a / l_
    if free @ free <= 1.0:
        w[live] = free
        return w
    from scipy.optimize import brentq

    size = lambda mu: float(np.sum((l_ * a / (l_ * l_ + mu)) ** 2)) - 1.0
    hi = max(float(np.max(np.abs(l_ * a))), 1e-300)
    mu = brentq(size, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps)
    w[live] = -l_ * a / (l_ * l_ + mu)
    w /= max(1.0, float(np.linalg.norm(w)))
    return w


def ball_pieces(f, xs, single, like, seed: int) -> tuple[list, float] | None:
    """(pieces at the least-norm point of the ellipsoid, its least norm), or None where the model does not hold
    (too many entries, pieces off the model)."""
    n = sum(x.numel() for x in xs)
    if n == 0 or n > MAX_BALL_ENTRIES:
        return None
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, n, generator=gen, dtype=torch.float64)

    def piece(d: torch.Tensor, k: int) -> torch.Tensor:
        return _flat(_locked_grad(f, xs, single, seed + 7_000_003 + k, {}, direction=_unflat(d, like))[0])

    plus = [piece(dirs[i], 2 * i) for i in range(n)]
    minus = [piece(-dirs[i], 2 * i + 1) for i in range(n)]
    if not all(bool(torch.isfinite(g).all()) for g in plus + minus):
        return None
    mids = torch.stack([(p + m) / 2 for p, m in zip(plus, minus, strict=True)])
    a = mids.mean(0)
    scale = max(float(torch.stack(plus + minus).abs().max()), 1e-300)
    tol = 1e-9 * scale
    if float((mids - a).abs().max()) > tol:  # the pieces are not a + (odd part): another kind of kink
        return None
    v = torch.stack([(p - m) / 2 for p, m in zip(plus, minus, strict=True)])  # rows v_i
    t = (dirs * v).sum(1)
    c2k = torch.linalg.solve(dirs, (v * t[:, None])).T  # c^2 K D = V diag(t): (c^2 K) = (D^-T (V diag t)^T)^T
    c2k = (c2k + c2k.T) / 2
    evals, evecs = torch.linalg.eigh(c2k)
    lam = evals.clamp_min(0).sqrt().numpy()
    sign = 1.0 if float(t.sum()) >= 0 else -1.0
    u_, alpha = evecs.numpy(), (evecs.T @ a).numpy()
    w = _trust_region(alpha, lam)
    least = float(np.linalg.norm(alpha + lam * w))
    norm_w = float(np.linalg.norm(w))
    if norm_w == 0.0:
        return [], least
    pinv = np.where(lam > 1e-12 * max(float(lam.max()), 1e-300), 1 / np.where(lam > 0, lam, 1), 0.0)
    d_star = torch.from_numpy(u_ @ (pinv * w)) * sign
    target = a + torch.from_numpy(u_ @ (lam * w)) / norm_w  # the boundary point a + Q w / |w|
    found = [piece(d_star, 2 * n), piece(-d_star, 2 * n + 1)]
    off = float((found[0] - target).abs().max()) > max(tol, 1e-9 * float(target.abs().max()))
    if off or not all(bool(torch.isfinite(g).all()) for g in found):
        return None
    return [_unflat(g, like) for g in found], least
