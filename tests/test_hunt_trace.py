"""Hunt for defects in the explanation features (gw.trace, gw.watch, the report): realistic scenarios whose ground
truth is built into the program (which line made the NaN/Inf, which .grad holds it)."""

from __future__ import annotations

import torch

import gradwise as gw


def test_a_compiled_models_parameters_are_named_as_the_user_knows_them():
    """`model = torch.compile(model)` wraps it in an OptimizedModule whose named_parameters() say
    `_orig_mod.0.weight`: reaches named `model._orig_mod.0.weight`, a name the user never wrote (PyTorch's own
    state-dict helpers strip `_orig_mod.`, as FSDP's strip `_fsdp_wrapped_module.`)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model = torch.compile(model, backend="eager")
    x = torch.randn(6, 4)
    x[4:] = float("nan")
    with gw.trace() as report:
        model(x)[:4].sum().backward()
    (f,) = report.findings
    bad = {f"model.{n.removeprefix('_orig_mod.')}" for n, p in model.named_parameters()
           if not bool(p.grad.isfinite().all())}
    assert f.kind == "contamination" and set(f.reaches) == bad == {"model.0.weight", "model.2.weight"}, str(report)

