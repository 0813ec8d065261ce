"""Hunt (session 31): gw.watch() and gw.trace() around torch.compile'd training steps.

The reference is the eager program's gw.trace() report: a NaN batch at step 1, SGD writes the NaN gradients into
the parameters, and every later step's NaN follows from that (downstream), never "birth not observed".
"""

from __future__ import annotations

import pytest
import torch

import gradwise as gw
from _compiling import fresh_dynamo  # noqa: F401 (an autouse fixture: every test here)

nan = float("nan")


def _training(backend: str | None, block, steps: int = 4, nan_at: int = 1):
    """Linear + tanh + Linear, SGD, the batch of step ``nan_at`` holding one NaN; a finite step compiles first,
    outside the block. Returns the block's report."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        return ((model(x) - y) ** 2).mean()

    fn = step if backend is None else torch.compile(step, backend=backend)
    xs = [torch.randn(6, 4) for _ in range(steps + 1)]
    ys = [torch.randn(6, 1) for _ in range(steps + 1)]
    xs[1 + nan_at][2, 1] = nan
    fn(xs[0], ys[0]).backward()  # the compile, finite
    with block() as report:
        for k in range(1, steps + 1):
            opt.zero_grad()
            fn(xs[k], ys[k]).backward()
            opt.step()
    assert all(not p.isfinite().all() for p in model.parameters())  # the NaN reached the parameters
    return report


def _unobserved(report) -> list:
    return [f for f in report.findings if f.op == "unknown"]


@pytest.mark.parametrize("backend", [None, "aot_eager", "inductor"])
def test_traced_training_after_a_nan_step_is_downstream(backend, functorch_config):
    """The reference (eager), aot_eager and inductor (compiled before the block) under gw.trace(): one root cause
    (the NaN batch, named as the eager trace names it: dynamo runs the compiled frame eagerly under the trace's
    dispatch mode), the later steps downstream of it. (Passes on the base too: pins what docs/compile.md says.)"""
    functorch_config(donated_buffer=False)
    report = _training(backend, gw.trace)
    assert not _unobserved(report), str(report)
    roots = [f for f in report.findings if not f.downstream]
    assert [(f.kind, f.op) for f in roots] == [("nan", "input")], str(report)
    assert all(f.step == 1 for f in report.findings)


def test_watched_inductor_nan_step_is_not_explained_and_later_steps_are_downstream(functorch_config):
    """Inductor's backward keeping its graph (``donated_buffer=False``): the watch's replay ran its generated
    kernels, whose ops it does not see. The replay's gradients held NaN no seen op made: each parameter got a
    finding "genuine NaN ... its birth was not observed (made outside the traced block?)", beside a "compiled
    graph made NaN" birth reaching no gradient and a part explained for the biases only. Now the step is one
    finding not explained (saying why and how to have it explained), whose provenance the optimizer's write
    and every later step inherit, as in the eager reference."""
    functorch_config(donated_buffer=False)
    report = _training("inductor", gw.watch)
    text = str(report)
    assert not _unobserved(report), text
    roots = [f for f in report.findings if not f.downstream]
    assert [(f.kind, f.op, f.step) for f in roots] == [("nan", "backward", 1)], text
    assert sorted(roots[0].reaches) == ["model.0.bias", "model.0.weight", "model.2.bias", "model.2.weight"]
    assert "generated kernels" in roots[0].message and "aot_eager" in roots[0].message, text
    assert report.summary().startswith("0 contamination findings, 0 genuine NaN, 0 genuine Inf, 0 kinks, "
                                       "0 singular points, 1 not explained"), text
    assert [f.step for f in report.findings if f.downstream] == [1], text  # the optimizer's write, then inherited


def test_watched_step_with_donated_buffers_says_why_and_how(functorch_config):
    """AOTAutograd donates a compiled backward's saved buffers by default: the watch runs that step without
    keeping its graph, and a non-finite step cannot be replayed. The finding and the note quoted PyTorch's
    "Trying to backward through the graph a second time (or directly access saved tensors after they have
    already been freed). Saved intermediate values of the graph" cut short; they now say that the buffers were
    donated and how to have the step explained, and claim no classification."""
    functorch_config(donated_buffer=True)
    report = _training("aot_eager", gw.watch)
    text = str(report)
    roots = [f for f in report.findings if not f.downstream]
    assert [(f.kind, f.op, f.step) for f in roots] == [("nan", "backward", 1)], text
    for said in (roots[0].message, report.notes[0]):
        assert "donated_buffer = False" in said and "gw.trace()" in said, said
        assert "second time" not in said, said
    assert "contamination or genuine" in text and not _unobserved(report), text
    assert ", 0 genuine NaN," in report.summary() and "1 not explained" in report.summary(), text
    # the remedy it names: the same loop with donated_buffer False is explained (the NaN batch)
    functorch_config(donated_buffer=False)
    torch._dynamo.reset()
    explained = _training("aot_eager", gw.watch)
    roots = [f for f in explained.findings if not f.downstream]
    assert [(f.kind, f.step) for f in roots] == [("nan", 1)] and roots[0].op != "backward", str(explained)


def test_watch_checks_the_parameters_of_a_reentrant_checkpoints_inner_backward():
    """SILENT: a reentrant checkpoint runs its block's backward as a second torch.autograd.backward inside the
    step's; the block's parameters are no leaves of the outer graph, so the watch checked only the outer leaves.
    Padding rows made NaN before the block and sliced away after it: block.weight.grad is NaN (0 x NaN) while
    every outer gradient is finite, and the watch said "No NaN/Inf gradients" (gw.trace(): contamination reaching
    block.weight). The watch cannot replay a reentrant checkpoint (documented): it now says the step's gradient is
    not explained, reaching block.weight, and how to have it explained."""
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    lin2, block, scale = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Parameter(torch.ones(()))
    x = torch.randn(4, 3)
    pad = torch.tensor([False, False, True, True])[:, None]

    def step():
        h = torch.where(pad, nan, lin2(x))  # padding rows
        return (cp.checkpoint(block, h, use_reentrant=True)[:2] * scale).sum()

    with gw.trace() as traced:
        step().backward()
    assert [(f.kind, f.reaches) for f in traced.findings] == [("contamination", ["block.weight"])]
    for p in (*lin2.parameters(), *block.parameters(), scale):
        p.grad = None
    with gw.watch() as report:
        step().backward()
    assert not block.weight.grad.isfinite().all() and lin2.weight.grad.isfinite().all()
    assert [(f.kind, f.born_op, f.reaches) for f in report.findings] == [("nan", "backward", ["block.weight"])]
    assert "use_reentrant=True" in report.notes[0] and "gw.trace() has it explained" in report.notes[0]
    assert "1 not explained" in report.summary()
