"""Subdifferentials and stationarity certificates: enumeration, the least-norm QP, sampling, near-ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import gradwise as gw


def slsqp_min_norm(g: np.ndarray) -> float:
    """Least norm over conv(rows of g) by SLSQP on the simplex: an independent check of the NNLS route."""
    k = len(g)
    res = minimize(lambda lam: float(np.sum((lam @ g) ** 2)), np.full(k, 1 / k), jac=lambda lam: 2 * g @ (lam @ g),
                   method="SLSQP", bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    return float(np.sqrt(max(res.fun, 0)))


@pytest.mark.parametrize("seed", range(5))
def test_min_norm_agrees_with_an_independent_solver(seed):
    g = np.random.default_rng(seed).normal(size=(7, 4)) + (seed % 2) * 2.0
    sd = gw.Subdifferential([(torch.tensor(row),) for row in g], exact=True)
    ours = float(torch.linalg.vector_norm(sd.min_norm_element()[0]))
    assert ours == pytest.approx(slsqp_min_norm(g), abs=1e-6)
    lam = sd.min_norm_weights()
    assert lam.min() >= 0 and lam.sum() == pytest.approx(1.0)


def test_differentiable_point_nonzero_gradient_is_proved_not_stationary():
    cert = gw.stationarity(lambda x: (x**2).sum(), torch.tensor([1.0, 2.0]))
    assert cert.stationary is False and cert.exact and cert.kinks == []
    assert cert.min_norm == pytest.approx(np.sqrt(20.0))


def test_relu_difference_is_not_stationary_although_pytorch_says_zero():
    f = lambda x: torch.relu(x) - torch.relu(-x)
    cert = gw.stationarity(f, torch.tensor(0.0))
    assert cert.stationary is False and cert.min_norm == pytest.approx(1.0)
    assert [k.op for k in cert.kinks] == ["aten.relu", "aten.relu"]


def test_inactive_branch_combinations_are_not_pieces():
    # relu(x) - relu(x) + x is x: the branch combinations (on, off)/(off, on) are never active
    sd = gw.subdifferential(lambda x: torch.relu(x) - torch.relu(x) + x, torch.tensor(0.0))
    assert sd.exact and [float(e[0]) for e in sd.elements] == [1.0]


def test_sampling_beyond_the_enumeration_budget_never_claims_false():
    x = torch.zeros(20)  # 20 kinks: more than enumerated exactly
    cert = gw.stationarity(lambda x: (x.abs() + 0.5 * x).sum(), x)
    assert not cert.exact and cert.stationary in (True, None)
    cert = gw.stationarity(lambda x: (x.abs() + 2 * x).sum(), x)  # truly not stationary, but unproven
    assert cert.stationary is None and cert.min_norm > 0


def test_near_ties_are_reported():
    x = torch.tensor([1e-9, 1.0], dtype=torch.float64)
    cert = gw.stationarity(lambda x: x.abs().sum(), x)
    assert cert.kinks == [] and cert.near_kinks and cert.near_kinks[0].op == "aten.abs"
    # with a tolerance the near-tie counts as a tie: an epsilon-subdifferential
    cert = gw.stationarity(lambda x: x.abs().sum() - x[1], x, tie_tol=1e-6)
    assert cert.stationary is True


def test_seed_iou_certificate_and_str():
    def iou(ps, pe):
        ts, te = torch.tensor([5.0, 2.0]), torch.tensor([5.0, 4.0])
        common = (torch.minimum(pe, te) - torch.maximum(ps, ts) + 1).clamp_min(0)
        return (1 - common / ((pe - ps + 1).clamp_min(0) + (te - ts + 1) - common)).mean()

    cert = gw.stationarity(iou, (torch.tensor([5.0, 2.0]), torch.tensor([5.0, 4.0])))
    assert cert.stationary is True and cert.exact and len(cert.subdifferential.elements) == 16
    assert "stationary" in str(cert) and "aten.minimum" in str(cert)
