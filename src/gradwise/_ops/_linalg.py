"""Kinks of the matrix factorisations: repeated eigenvalues (eigh, eig), repeated or zero singular values (svd),
LU's pivot ties and QR's Householder sign choices, and det's derivative formula at singular matrices: added to
``_kinks.KINKS``. PyTorch's derivative formulas
assume a smooth branch of the factorisation; at these points there is none (the values kink, or the factors
jump), so nonsmooth calculus refuses a rule-less call there (``_nonsmooth/_kink_watch.py``) and the trace names
the point.

May import: torch, ``_kinks``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from gradwise._ops._kinks import KINKS, OpCall, Site, _kink

aten = torch.ops.aten
Tensor = torch.Tensor


@_kink(aten._linalg_eigh, kind="singular", needs_out=True,
       convention="eigenvalues: one eigenbasis's gradient; eigenvectors: NaN/Inf (1 / (λi - λj))")
def _eigen_ties(c: OpCall):
    """eigh with repeated eigenvalues (they come sorted; a zero eigenvalue is no kink): eigenvalues are not
    differentiable there and the eigenvectors' backward divides by their difference."""
    vals = c.out[0]
    if vals.shape[-1] < 2:
        return None
    return Site(vals.diff(dim=-1) == 0, aligned=False)


@_kink(aten.linalg_eig, kind="singular", needs_out=True,
       convention="eigenvalues: diag(V⁻¹ A' V) for one eigenbasis V; eigenvectors: NaN/Inf (1 / (λj - λi))")
def _general_eigen_ties(c: OpCall):
    """eig (and eigvals, which runs it) with a repeated eigenvalue (unsorted, complex): the eigenvalues' one-sided
    derivatives are those of V⁻¹ A' V restricted to the eigenspace (or, for a defective one, infinite), not its
    diagonal for the basis LAPACK returned, which is what PyTorch's forward mode and backward use."""
    vals = c.out[0]
    if vals.shape[-1] < 2:
        return None
    return Site((vals.unsqueeze(-1) == vals.unsqueeze(-2)).sum(-1) > 1, aligned=False)


@_kink(aten._linalg_svd, kind="singular", needs_out=True,
       convention="singular values: one basis's gradient (one side's at σ = 0); singular vectors: NaN/Inf at "
                  "repeated values (1 / (σi² - σj²))")
def _singular_value_ties(c: OpCall):
    """svd with repeated singular values (the vectors' backward divides by σi² - σj²), or a zero one (|σ| is not
    differentiable at 0)."""
    vals = c.out[1]
    mask = vals == 0
    if vals.shape[-1] > 1:
        tie = vals.diff(dim=-1) == 0
        mask = mask | F.pad(tie, (0, 1)) | F.pad(tie, (1, 0))
    return Site(mask, aligned=False)


def _pivot_ties(lower: Tensor, diag: Tensor) -> Tensor:
    """Per elimination step k (with rows below it), whether partial pivoting had a choice: a candidate as large
    in magnitude as the pivot (|L[i, k]| = |a_i| / |a_p| is 1, up to the rounding of LAPACK's scaling by 1 / a_p:
    a few ulps, a superset), or a zero pivot (an all-zero column: any row would do)."""
    steps = min(lower.shape[-2] - 1, diag.shape[-1])  # the last row has no choice
    if steps < 1:
        return torch.zeros(diag.shape, dtype=torch.bool, device=diag.device)
    near_one = 1 - 4 * torch.finfo(lower.real.dtype).eps
    below = lower[..., :, :steps].tril(-1).abs()
    tie = (below >= near_one).any(-2) | (diag[..., :steps] == 0)
    return F.pad(tie, (0, diag.shape[-1] - steps))


@_kink(aten.linalg_lu, needs_out=True, convention="the pivot LAPACK picked (the first of the tied rows)")
def _lu_pivot_ties(c: OpCall):
    """LU with partial pivoting where a pivot is tied: the row picked decides L and U, which kink (U's pivot row is
    ±max |a_i|) or jump (its other entries) there; PyTorch differentiates the picked row's factors."""
    if not c.arg(1, "pivot", True):
        return None
    _, lower, upper = c.out
    return Site(_pivot_ties(lower, upper.diagonal(dim1=-2, dim2=-1)), aligned=False)


@_kink(aten.linalg_lu_factor_ex, needs_out=True, convention="the pivot LAPACK picked (the first of the tied rows)")
def _lu_factor_pivot_ties(c: OpCall):
    """lu_factor (packed L and U, as torch.lu): the pivot ties of ``linalg_lu``."""
    if not c.arg(1, "pivot", True):
        return None
    lu = c.out[0]
    return Site(_pivot_ties(lu, lu.diagonal(dim1=-2, dim2=-1)), aligned=False)


@_kink(aten.linalg_qr, kind="jump", coarse=True,
       convention="the Householder reflection LAPACK took (none where the column below is 0)")
def _householder_sign_choices(c: OpCall):
    """QR (geqrf's Householder reflections) where a step's choice is not continuous: its column below the
    diagonal is 0 (no reflection, tau = 0: R[k, k] = a_kk, while any nearby matrix reflects and gets
    R[k, k] = -sign(a_kk) · norm, the opposite sign), or its diagonal entry is 0 (tau = 1: -sign(±0) flips). Q and
    R jump there (A = I: R = I, and -I nearby); a sign-invariant f (|R[k, k]|, Q R) is continuous, but PyTorch's
    derivative is that of the branch taken. The steps are read from geqrf, which linalg_qr runs. A jump located
    per step, not per element (``coarse``: the trace, which has no NaN to explain there, skips it)."""
    a = c.args[0]
    if not isinstance(a, Tensor) or not (a.is_floating_point() or a.is_complex()) or a.shape[-2] < 2:
        return None
    with torch.no_grad():
        tau = torch.geqrf(a.detach())[1]
    steps = min(a.shape[-2] - 1, tau.shape[-1])  # the last row's step never reflects
    return Site(F.pad((tau[..., :steps] == 0) | (tau[..., :steps] == 1), (0, tau.shape[-1] - steps)),
                aligned=False)


def _det_singular(c: OpCall) -> bool:
    """PyTorch's derivative of det (det times A⁻¹, both modes) is 0 where det(A) == 0, though the derivative,
    tr(adj(A) A'), is not at rank n - 1. Not a kink: gradwise's det rule corrects it, code it cannot see refuses."""
    a, out = c.args[0], c.out
    return isinstance(a, Tensor) and a.is_floating_point() and bool((out[0] == 0).any())


@_kink(aten._linalg_det, needs_out=True, convention="0 at a singular matrix (wrong: adj(A) at rank n - 1)")
def _no_det_kink(c: OpCall):
    """det has no kink: only ``formula_off`` (below)."""
    return None


KINKS[aten._linalg_det] = dataclasses.replace(KINKS[aten._linalg_det], formula_off=_det_singular)
