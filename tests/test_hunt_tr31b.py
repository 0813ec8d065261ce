"""Hunt of trace31b: gw.watch()'s replay naming a value made inside a TorchScript graph; births that agree with
gw.strong_zeros() on the same program. Ground truth is plain torch with gw.strong_zeros() (which gradient elements
stay non-finite) with each write alone, never the trace itself."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

import gradwise as gw
from _explaining import genuine_findings

_PROGRAMS = pathlib.Path(__file__).with_name("_explain_programs.py")


def _explain_programs(tmp_path):
    spec = importlib.util.spec_from_file_location("_gw_explain_programs_tr31b", _PROGRAMS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.PROGS = str(tmp_path)
    return mod


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in 2.13
def test_watch_replay_never_calls_a_torchscript_value_data_that_arrived(tmp_path):
    """Before: gw.watch()'s replay of program 7 of tests/_explain_programs.py (a packed GRU, then a TorchScript
    block whose sqrt of a negative makes NaN) named a value saved inside the TorchScript graph "tensor[2, 5, 4]
    arrived with 10 NaN value(s)": a node made it (DifferentiableGraphBackward), so it is no data; the replay
    does not know which op inside made it and says so ("aten.sqrt or an op before it")."""
    progs = _explain_programs(tmp_path)
    prog = progs.Prog(7, None, None)
    mod, _, _ = progs.load(prog, f"{tmp_path}/p7.py")
    assert (prog.wrap, prog.inject) == ("script", "sqrtneg")
    progs.run_trace(prog, mod)  # (as the checker: TorchScript's profiling runs make its differentiable graph)
    rep, _ = progs.run_trace(prog, mod, watch=True)
    data = json.loads(rep.to_json())
    assert any(f.kind == "nan" for f in rep.findings), str(rep)
    assert "arrived with" not in str(rep), str(rep)
    assert all(f.get("born_op") != "input" for f in data["findings"]), str(rep)


_ROWS = {
    "tanh sum pow": lambda y: y.tanh().sum(1).pow(2).sum(),
    "sigmoid prod": lambda y: y.sigmoid().prod(1).sum(),
    "sigmoid prod pow": lambda y: y.sigmoid().prod(1).pow(2).sum(),
}


@pytest.mark.parametrize("op", list(_ROWS))
def test_an_inf_met_by_a_nan_sensitivity_beside_a_nan_write_is_named(op):
    """SILENT before: x[0, 0] = inf and x[0, 1] = nan (two writes, one row), then `f(x * w)` reduced per row: w's
    gradient at (0, 0) is NaN with either write alone (0 x inf through f'(inf) = 0; the NaN row's sensitivity),
    but the mul's backward met both parts in one incident, named after the NaN birth alone: the Inf write was
    named nowhere (main) or "reaches: no gradient" (base, through tanh). Reference: gw.strong_zeros() with each
    write alone."""
    def program(inf: bool, nan: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if inf:
            x[0, 0] = float("inf")
        if nan:
            x[0, 1] = float("nan")
        _ROWS[op](x.clone() * w).backward()
        return w

    for writes in ((True, False), (False, True)):
        with gw.strong_zeros():
            assert not bool(program(*writes).grad[0, 0].isfinite())
    with gw.trace() as report:
        program(True, True)
    assert not [f for f in report.findings if f.kind == "contamination"], str(report)
    # each write a genuine finding that reaches w (base named the Inf one "reaches: no gradient")
    reached = {f.born_location: f.reaches for f in genuine_findings(report)}
    assert len(reached) == 2 and all(r == ["w"] for r in reached.values()), str(report)


def test_gru_padding_beside_a_used_inf_is_told_as_strong_zeros_tell_it():
    """SILENT on base: x[4:] = nan (padding, fill_) and x[2, 2] = inf (used, copy_), fed to a GRU through an expand
    and read as `o[:, -1].sum(1)[:4]`: the padding was the genuine finding (8 elements reaching weight_ih) and
    the used Inf got none. Reference: gw.strong_zeros() with each write alone (padding alone: every gradient
    finite; the Inf alone: weight_ih's not)."""
    def program(pad: bool, inf: bool):
        torch.manual_seed(0)
        gru = torch.nn.GRU(4, 3, batch_first=True)
        x = torch.randn(6, 4)
        if pad:
            x[4:] = float("nan")
        if inf:
            x[2, 2] = float("inf")
        o, _ = gru(x[:, None].expand(6, 3, 4))
        o[:, -1].sum(1)[:4].pow(2).sum().backward()
        return gru

    with gw.strong_zeros():
        assert all(bool(p.grad.isfinite().all()) for p in program(True, False).parameters())
    with gw.strong_zeros():
        assert not bool(program(False, True).weight_ih_l0.grad.isfinite().all())
    with gw.trace() as report:
        program(True, True)
    genuine = genuine_findings(report)
    assert [f.born_op for f in genuine] == ["aten.copy_"] and genuine[0].indices == [[2, 2]], str(report)
    assert "weight_ih_l0" in genuine[0].reaches[0], str(report)
    assert [f.born_op for f in report.findings if f.kind == "contamination"] == ["aten.fill_"], str(report)


def _gru_expand(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)
    o, _ = torch.nn.GRU(4, 3, batch_first=True)(x[:, None].expand(6, 3, 4))
    return o[:, -1].sum(1)[:4].pow(2).sum()


_ARRIVED = {
    "gru over an expand": _gru_expand,
    "linear tanh": lambda x: torch.tanh(torch.nn.Linear(4, 3)(x)).sum(1)[:4].pow(2).sum(),
}


@pytest.mark.parametrize("op", list(_ARRIVED))
def test_data_arriving_with_nan_padding_and_a_used_inf_is_told_apart(op):
    """Before: x arriving (written before the traced block) with NaN padding rows 4: and a used Inf at x[2, 2]:
    one birth "x arrived with 9 NaN value(s)" (27 through the GRU's expand), whose genuine finding counted the
    padding's elements beside the Inf (first at (2, 2), (4, 0), ...); strong zeros with the padding alone leave
    every gradient finite, so the genuine finding is the Inf's alone. Now a NaN and an Inf birth, as parts."""
    def program(pad: bool, inf: bool, trace: bool = False):
        torch.manual_seed(0)
        x = torch.randn(6, 4)
        if pad:
            x[4:] = float("nan")
        if inf:
            x[2, 2] = float("inf")
        with gw.trace() if trace else gw.strong_zeros() as report:
            torch.manual_seed(2)
            w = torch.ones(4, requires_grad=True)
            _ARRIVED[op](x * w).backward()
        return w.grad, report

    assert bool(program(True, False)[0].isfinite().all())
    assert not bool(program(False, True)[0].isfinite().all())
    _, report = program(True, True, trace=True)
    genuine = genuine_findings(report)
    assert len(genuine) == 1 and ("1 Inf" in genuine[0].born or "3 Inf" in genuine[0].born), str(report)
    assert all(i[0] == 2 for i in genuine[0].indices), str(report)
    assert [f for f in report.findings if f.kind == "contamination" and "NaN" in f.born], str(report)
