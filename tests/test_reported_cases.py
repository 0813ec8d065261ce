"""Cases modelled on public bug reports, written by hunts for wrong answers (tests/reported/), in the shared
cases' formats: each contamination case carries the gradient of the same program with the unused values
deleted; each nonsmooth case its validated one-sided derivatives, subdifferential vertices and stationarity.

Cases gradwise does not pass yet are strict xfails with the reason, so a fix shows up as a failure to remove.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import case_files
import gradwise as gw

HERE = Path(__file__).resolve().parent / "reported"

pytestmark = pytest.mark.filterwarnings(r"ignore:index_reduce\(\) is in beta:UserWarning")

KNOWN = {
    # contamination: backward ops without a rule, or a limit written down in docs/strong-zeros-design.md
    # nonsmooth: a clear NonsmoothError or an undecided certificate instead of an answer
    "row-norms-with-a-zero-row": "a norm at 0 is a continuum of pieces: stationarity is sampled, undecided",
    "sqrt-of-square-at-zero": "sqrt at 0 raises (singular); use linalg.vector_norm",
    "max-eigenvalue-repeated": "an eigenvalue cluster is a continuum of pieces: stationarity is sampled, "
                               "undecided (directions and generalized gradients are exact)",
    "where-eq-zero-guard-expm1-over-x": "a removable singularity behind x == 0: NonsmoothError (f's branch changes)",
    "checkpoint-reentrant-block-nan-rows-sliced": "PyTorch: reentrant checkpoint is incompatible with .grad()",
    "complex-abs-at-zero-stft-silence": "abs of a complex 0 is a cone: NonsmoothError",
    "double-where-safe-norm-at-zero": "the branch r2's second-order tangent picks is sqrt(r2) at r2 = 0: "
                                      "NonsmoothError (sqrt at 0, a norm written by hand; before session 30 the "
                                      "comparison kept its value: 0.5 d0, silent)",
    "lp-pool2d-p2-all-zero-window": "lp_pool2d(norm_type=2) is pow(sum x^2, 1/2): at an all-zero window it raises "
                                    "like sqrt-of-square-at-zero (a norm written by hand)",
}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"reported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    with warnings.catch_warnings():  # some cases compute their data with index_reduce, a beta API that warns
        warnings.filterwarnings("ignore", r"index_reduce\(\) is in beta", UserWarning)
        spec.loader.exec_module(module)
    return module


def _params(pattern: str, value):
    out = []
    for path in sorted(HERE.glob(pattern)):
        for case in _load(path).CASES:
            reason = KNOWN.get(case.name)
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            out.append(pytest.param(value(path, case), id=f"{path.stem}-{case.name}", marks=marks))
    return out


@pytest.mark.parametrize("case", _params("contamination_*.py", lambda path, case: case))
def test_reported_contamination(case):
    output, inputs, expected = case.build()
    got = gw.grad(output, inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.to(g.dtype), equal_nan=True, rtol=1e-5, atol=1e-6)


def _checker():
    return case_files.load(case_files.PROJECT / "check_nonsmooth.py", "reported")


@pytest.mark.parametrize("case", _params("nonsmooth_*.py", lambda path, case: case))
def test_reported_nonsmooth(case):
    assert _checker().check_case(gw, case) == []
