"""Session 33 (nonsmooth, kink sweep's last failures): eigen/singular values tied in the input but split by
LAPACK's rounding, and the sweep's jump test at a smooth piece narrower than its steps. References: float64
one-sided differences at several steps, and the values along the direction (the tie's cluster)."""
from __future__ import annotations

import pytest
import torch

import _kink_sweep as ks
import gradwise as gw
from gradwise import NonsmoothError

D = torch.float64
ROT = torch.tensor([[3.0, 2.0], [-2.0, 3.0]], dtype=D)  # sqrt(13) times a rotation: both singular values tie
DIR = torch.tensor([[0.7, -1.2], [0.4, 0.9]], dtype=D)
ONES = torch.ones(3, 3, dtype=D)  # eigenvalues 0, 0, 3 (LAPACK: -3.3e-16, 0, 3)
SYM = torch.tensor([[1.0, 0.3, -0.5], [0.3, -1.0, 0.2], [-0.5, 0.2, 0.4]], dtype=D)


def _quotients(f, x, d):
    with torch.no_grad():
        return [(f(x + t * d) - f(x)) / t for t in (1e-5, 1e-6, 1e-7)]


TIED_IN_ROUNDING = {  # name: (f, x, d); gradwise gave the split pieces' derivative, differences the cluster's
    "spectral norm of a scaled rotation": (lambda a: torch.linalg.matrix_norm(a, 2), ROT, DIR),
    "svdvals of a scaled rotation": (torch.linalg.svdvals, ROT, DIR),
    "eigvalsh of ones(3, 3)": (torch.linalg.eigvalsh, ONES, SYM),
}


@pytest.mark.parametrize("name", TIED_IN_ROUNDING)
def test_values_tied_within_rounding_refuse(name):
    """matrix_norm([[3, 2], [-2, 3]], 2) along DIR: gradwise gave 0.361 (u1 v1ᵀ of two values 1 ulp apart), the
    differences 0.634 (the largest eigenvalue of sym(Qᵀ DIR), the cluster's); eigvalsh(ones(3, 3)) along SYM:
    (0.767, -0.5) for (-0.940, 1.206). The input's values tie exactly; the computed ones differ in the last bit,
    so the tie rule never fired: now an error (gradwise cannot tell an exact tie from a 1-ulp gap)."""
    f, x, d = TIED_IN_ROUNDING[name]
    q = _quotients(f, x, d)
    assert torch.allclose(q[1], q[2], atol=1e-5)  # (the differences converge: f is directionally differentiable)
    assert not torch.allclose(torch.func.jvp(f, (x,), (d,))[1], q[2], atol=1e-2)  # (the split pieces' number)
    with pytest.raises(NonsmoothError, match="within LAPACK's rounding"):
        gw.directional_derivative(f, (x,), (d,))


def test_exact_and_distinct_values_unchanged():
    """Exact ties (the identity: bitwise equal values) keep the cluster rule; distinct values PyTorch's derivative,
    bitwise; the nuclear norm at the rotation its (smooth) derivative; stationarity(tie_tol=...) still answers at
    the rotation (the cluster there)."""
    eye = torch.eye(2, dtype=D)
    got = gw.directional_derivative(lambda a: torch.linalg.matrix_norm(a, 2), (eye,), (DIR,))
    assert torch.allclose(got, _quotients(lambda a: torch.linalg.matrix_norm(a, 2), eye, DIR)[2], atol=1e-6)
    a = torch.tensor([[3.0, 1.0], [0.5, -2.0]], dtype=D)
    got = gw.directional_derivative(torch.linalg.svdvals, (a,), (DIR,))
    assert torch.equal(got, torch.func.jvp(torch.linalg.svdvals, (a,), (DIR,))[1])
    nuc = lambda a: torch.linalg.matrix_norm(a, "nuc")  # (a positive cluster's sum is smooth: no error)
    assert torch.allclose(gw.directional_derivative(nuc, (ROT,), (DIR,)), _quotients(nuc, ROT, DIR)[2], atol=1e-6)
    r = gw.stationarity(lambda a: torch.linalg.matrix_norm(a, 2), (ROT,), tie_tol=1e-12)
    assert r.near_kinks and r.kinks


def test_sweep_jump_test_at_a_narrow_smooth_piece():
    """pairwise_distance with p = -1 at x1 - x2 = (6, 0, -9) adds eps = 1e-6: f is smooth within 1.5e-6 of x along
    d (slope -0.6724), but the sweep's jump test (steps 5e-7, 5e-6) leaves that piece and called gradwise's number
    'silent at a jump'; normalize's clamp_min(eps = 1e-12) at 0 (slope d / eps) the same at every direction. The
    test now asks tiny steps first; a real jump (sign) still fails the number gradwise would give."""
    x1, x2 = torch.tensor([3.0, -4.0, -3.0], dtype=D), torch.tensor([-3.0, -4.0, 6.0], dtype=D)
    d1, d2 = torch.tensor([0.8076, -0.0101, -0.2313], dtype=D), torch.tensor([2.1450, 0.6622, -0.8560], dtype=D)
    cases = [
        (lambda a, b: torch.nn.functional.pairwise_distance(a, b, p=-1.0).reshape(-1), (x1, x2), (d1, d2)),
        (lambda a: torch.nn.functional.normalize(a, dim=0), (torch.zeros(3, dtype=D),), (d1,)),
    ]
    for f, xs, ds in cases:
        quotients, jump = ks.one_sided(f, xs, ds)
        assert bool(jump.any())  # (the steps leave the piece)
        assert ks._check(f, xs, ds, quotients, jump) == ("ok", "")
    f, xs, ds = torch.sign, (torch.zeros(2, dtype=D),), (torch.tensor([1.0, -1.0], dtype=D),)
    quotients, jump = ks.one_sided(f, xs, ds)
    assert ks._narrow_smooth(f, xs, ds, torch.zeros(2, dtype=D)).sum() == 0  # (0 for a jump: not rescued)
