"""gw.watch(): plain PyTorch (bitwise, same graph lifetime) while gradients are finite; the first non-finite
gradient's step explained, and the rest traced. References: the same program without gradwise (gradients,
errors) and gw.trace() of the same step."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gradwise as gw
from gradwise import _native
from gradwise._trace import _session


@pytest.fixture(autouse=True, params=["native", "python"])
def _watch_path(request, monkeypatch):
    """Every test of the watch on both of its paths: the C++ helper's walk, check and release (built by conftest's
    ``native_helper``) and their Python twins (a machine without a compiler, ``GRADWISE_NATIVE=0``)."""
    if request.param == "python":
        monkeypatch.setattr(_native, "module", lambda: None)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _train(model, steps, nan_from=None, watch=True):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    grads = []
    ctx = gw.watch() if watch else torch.autograd.set_grad_enabled(True)
    with ctx as report:
        for step in range(steps):
            x = torch.randn(6, 6)
            if nan_from is not None and step >= nan_from:
                x[4:] = float("nan")
            loss = model(x)[:4].square().mean()
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
    return report, grads


def test_finite_run_is_plain_pytorch_and_reports_nothing():
    report, grads = _train(_model(), 5)
    _, plain = _train(_model(), 5, watch=False)
    assert not report.findings and not report.notes
    assert all(torch.equal(a, b) for ga, gb in zip(grads, plain, strict=True) for a, b in zip(ga, gb, strict=True))
    assert torch.autograd.backward.__module__ == "torch.autograd" and not _session._WATCHERS


def test_the_graph_is_freed_as_pytorch_frees_it_and_kept_when_asked():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gw.watch():
        y = (x * x).sum()
        y.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            y.backward()
        z = (x * x).sum()
        z.backward(retain_graph=True)
        z.backward()  # kept on request
    assert torch.equal(x.grad, torch.tensor([6.0, 12.0]))


@pytest.mark.parametrize("nonfinite_at", [None, 0, 1])
@pytest.mark.parametrize("how", ["backward", "autograd_grad"])
def test_the_kept_graph_does_not_outlive_its_step(how, nonfinite_at):
    """The watch keeps each step's graph for the length of its backward call only: a training loop that holds
    ``loss`` and ``out`` into the next forward (reassigned after it) holds the graph's nodes, and under plain
    PyTorch nothing they saved. A value only the graph saved must be gone when the backward returns, before the
    next forward allocates: a kept graph left to die with the user's tensors would hold two steps' activations
    at the next forward's peak; also the step whose non-finite gradient the watch explains (its release runs
    after the trace has started) and the traced steps after it. Reference: the same loop without gradwise; a
    weakref to a saved activation."""
    import weakref

    w = torch.nn.Parameter(torch.randn(4, 4))

    def loop(watched: bool) -> list[bool]:
        alive = []
        with gw.watch() if watched else contextlib.nullcontext():
            out = loss = None
            for step in range(3):
                data = torch.randn(2, 4)
                if step == nonfinite_at:
                    data[0, 0] = float("nan")
                hidden = data @ w  # saved by sin's node only, once this frame lets it go
                ref = weakref.ref(hidden)
                out = hidden.sin()
                loss = out.sum()
                del hidden
                if how == "autograd_grad":
                    torch.autograd.grad(loss, w)
                else:
                    loss.backward()
                alive.append(ref() is not None)  # (loss and out still held, as by the loop's variables)
        return alive

    assert loop(watched=False) == [False] * 3  # (the reference: the engine freed it)
    assert loop(watched=True) == [False] * 3


def test_first_nonfinite_step_is_explained_and_later_steps_traced():
    report, _ = _train(_model(), 8, nan_from=3)
    roots = [f for f in report.findings if not f.downstream]
    assert [f.kind for f in roots] == ["contamination"], str(report)
    assert roots[0].step == 3 and roots[0].discarded_op == "aten.slice" and roots[0].reaches
    assert [f.op for f in report.findings if f.downstream] == ["gradient"]
    (cause,) = report.causes
    assert cause.startswith("root cause at step 3") and "4 later steps" in cause
    assert "step 3" in report.notes[0]


def test_autograd_grad_under_watch():
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    with gw.watch() as report:
        (g,) = torch.autograd.grad(torch.where(x > 0, x.sqrt(), x).sum(), x)
    assert g.isnan().any() and x.grad is None
    (f,) = report.findings
    assert f.kind == "contamination" and f.reaches == ["x"] and f.step == 0


def test_watch_refuses_bad_options():
    with pytest.raises(ValueError, match="sync_every"), gw.watch(sync_every=0):
        pass


def test_a_trace_inside_a_watch_joins_it():
    """gw.trace() in a script run by `gradwise run --watch`, before any gradient went non-finite, ran on its own:
    the watch's report missed what the trace block found (a script whose only NaN is in that block got 'No
    NaN/Inf gradients') and its step numbers did not count the block's backward calls. The trace joins the watch
    (which traces in full from there), as a nested watch does. Reference: the same program under gw.trace()."""
    def run(ctx):
        lin = torch.nn.Linear(3, 1)
        x = torch.cat((torch.ones(2, 3), torch.full((1, 3), float("nan"))))
        with ctx() as whole:
            lin(x[:2]).sum().backward()
            with gw.trace() as inner:
                lin(x[:2]).sum().backward()
                lin(x)[:2].sum().backward()
            lin(x[:2]).sum().backward()
        return whole, inner

    whole, inner = run(gw.watch)
    ref, ref_inner = run(gw.trace)
    facts = lambda r: [(f.kind, f.reaches, f.count, f.step) for f in r.findings]
    assert facts(ref) == [("contamination", ["lin.weight"], 3, 2)], str(ref)
    assert facts(inner) == facts(ref_inner) == facts(ref), (str(inner), str(ref_inner))
    assert facts(whole) == facts(ref), str(whole)


@pytest.mark.parametrize("outer", ["trace", "watch"])
def test_a_nested_watch_joins_the_outer_block(outer):
    """gw.watch() in a script run by `gradwise run` (or inside gw.watch()) raised 'already watches': it joins the
    outer block, its report the outer's findings made in it; the outer report is the same as without it."""
    lin = torch.nn.Linear(3, 1)
    x = torch.cat((torch.ones(2, 3), torch.full((1, 3), float("nan"))))
    with getattr(gw, outer)() as whole:
        lin(x[:2]).sum().backward()
        with gw.watch() as inner:
            lin(x)[:2].sum().backward()
    assert [(f.kind, f.reaches) for f in inner.findings] == [("contamination", ["lin.weight"])], str(inner)
    assert "joined the outer block" in inner.notes[0]
    assert [(f.kind, f.reaches, f.count) for f in whole.findings] == [
        (f.kind, f.reaches, f.count) for f in inner.findings], str(whole)


@pytest.mark.parametrize("how", ["backward_inputs", "autograd_grad"])
def test_a_backward_toward_some_inputs_frees_only_what_it_ran(how):
    """The engine runs only the nodes on the way to the requested inputs; the trunk's saved tensors stay for a
    later backward through it. gw.watch() freed the whole graph ('backward through the graph a second time')."""
    w1, w2 = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with gw.watch():
        h = (torch.randn(3) * w1).sin()  # the trunk: its nodes keep saved tensors
        loss = (h * w2).sum()
        if how == "autograd_grad":
            torch.autograd.grad(loss, w2)
        else:
            loss.backward(inputs=[w2])
        h.sum().backward()
    assert w1.grad is not None
    with pytest.raises(RuntimeError, match="second time"):  # what ran is freed, as the engine frees it
        loss.backward(inputs=[w2])


def test_a_compiled_backward_with_donated_buffers_runs_as_asked():
    """A compiled backward with donated buffers refuses to run with its graph retained (which gw.watch() asks of
    every backward, for the replay): it runs as the caller asked, and the loop goes on (it raised on a finite
    step after a recompile for a new batch size)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, on the compiler's first import
        compiled = torch.compile(model)
        with gw.watch() as report:
            for n in (4, 6, 5):  # a new batch size: recompiled with dynamic shapes
                model.zero_grad()
                compiled(torch.randn(n, 4)).square().mean().backward()
    assert all(p.grad.isfinite().all() for p in model.parameters()) and not report.findings
    torch._dynamo.reset()


def test_autograd_grad_results_carry_the_explained_steps_provenance():
    """gw.watch() with torch.autograd.grad and p.grad = g; opt.step(): the optimizer's write is downstream of the
    explained step's finding (it was a root cause of its own, 'tensor arrived with NaN')."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with gw.watch() as report:
        for step in range(3):
            x = torch.randn(4, 3)
            if step == 1:
                x[2:] = float("nan")
            (g,) = torch.autograd.grad(lin(x)[:2].sum(), [lin.weight])
            lin.weight.grad = g
            opt.step()
    assert len(report.causes) == 1
    written = [f for f in report.findings if f.op == "gradient"]
    assert written and all(f.downstream for f in written)


def _compiled_padding_run(ctx):
    """A compiled model: NaN padding (sliced away) from step 2, a NaN the loss reads at step 3."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, on the compiler's first import
        compiled = torch.compile(model, backend="aot_eager")
        with ctx() as report:
            for step in range(4):
                x = torch.randn(6, 4)
                if step >= 2:
                    x[5] = float("nan")
                if step == 3:
                    x[0, 0] = float("nan")
                loss = compiled(x)[:5].pow(2).mean()
                model.zero_grad()
                loss.backward()
    torch._dynamo.reset()
    return report


def _compiled_step_run(ctx):
    """A whole training step compiled, its backward inside: dynamo graph-breaks at the wrapped
    torch.autograd.backward and runs it eagerly. NaN padding (sliced away) at step 2."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2)

    def step(x):
        lin.zero_grad()
        lin(x)[:3].sin().sum().backward()

    compiled = torch.compile(step, backend="aot_eager")
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, on the compiler's first import
        with ctx() as report:
            for n in range(4):
                x = torch.randn(4, 4)
                if n == 2:
                    x[3] = float("nan")
                compiled(x)
                grads.append(lin.weight.grad.clone())
    torch._dynamo.reset()
    return report, grads


def test_a_backward_inside_a_compiled_step_is_watched_with_dynamo_off():
    """The wrappers of torch.autograd.backward/grad keep dynamo out (a graph break at the call, its frame
    callback off inside) without PyTorch's torch.compiler.disable wrapper: were the watch's own frames compiled,
    torch.compiler.is_compiling() would read True there and the step would pass unchecked. References: the same
    program without gradwise (gradients, bitwise but NaN), gw.trace() (the step of the NaN, what it reaches)."""
    _, plain = _compiled_step_run(contextlib.nullcontext)
    watched, grads = _compiled_step_run(gw.watch)
    traced, _ = _compiled_step_run(gw.trace)
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(grads, plain, strict=True))
    # (the compiled backward does not keep its graph: the step is found, not classified, as in the test below)
    assert [(f.step, f.reaches) for f in watched.findings] == [(f.step, f.reaches) for f in traced.findings] == [
        (2, ["lin.weight"])], (str(watched), str(traced))
    assert "the first non-finite gradient came at step 2;" in watched.notes[0], watched.notes


def test_a_compiled_model_keeps_the_step_numbers_and_claims_no_unused_values():
    """torch.compile differentiates the graph on fake tensors while it compiles, through torch.autograd.grad:
    that call is no step (gw.watch() counted it, and every step number came out one too high). The replay of
    the first non-finite step fails (the compiled backward does not keep its graph): that step may have used
    the padding, so no value is listed as one no gradient used (it listed the padding row, which gw.trace()
    of the same program finds in its findings). Reference: gw.trace() of the same program."""
    traced = _compiled_padding_run(gw.trace)
    watched = _compiled_padding_run(gw.watch)
    first = min(f.step for f in traced.findings)
    assert f"the first non-finite gradient came at step {first};" in watched.notes[0], watched.notes
    steps = {(f.kind, f.born_op, f.born_location): f.step for f in traced.findings}
    # the step that could not be replayed is a finding of its own, not classified (born at its backward call)
    (unexplained,) = [f for f in watched.findings if f.born_op == "backward"]
    assert unexplained.step == first, str(watched)
    assert all(steps.get((f.kind, f.born_op, f.born_location)) == f.step
               for f in watched.findings if f is not unexplained), (str(watched), str(traced))
    assert set(watched.unused) <= set(traced.unused), (watched.unused, traced.unused)


_LIBRARY = '''
import torch


def fit(model, x):  # a training library: it runs the step and calls backward for the user
    loss = torch.log(model(x) * 0).mean()  # log(0): -inf, and an infinite derivative
    loss.backward()
'''


def _fit_through(lib, model, x):
    lib.fit(model, x)  # the user's line


def _library(folder: Path):
    folder.mkdir(parents=True)
    (folder / "trainlib.py").write_text(_LIBRARY)
    spec = importlib.util.spec_from_file_location(f"trainlib_{folder.parent.name}", folder / "trainlib.py")
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    return lib


@pytest.mark.parametrize("ctx", [gw.watch, gw.trace])
def test_a_library_that_calls_backward_for_the_user_is_not_the_location(ctx, tmp_path):
    """An installed library (Lightning, accelerate) runs the step and calls backward: the findings are located at
    the user's line that called it (they named lightning/pytorch/core/module.py). The same library outside
    site-packages is the user's own code: located in it."""
    user_line = f"{Path(__file__).name}:{_fit_through.__code__.co_firstlineno + 1}"
    for folder, expected in ((tmp_path / "lib" / "python3" / "site-packages", user_line),
                             (tmp_path / "project", "trainlib.py:")):
        lib = _library(folder)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        with ctx() as report:
            _fit_through(lib, model, torch.randn(2, 4))
        assert report.findings and all(expected in f.location for f in report.findings), str(report)


_FIRST_COMPILE_INSIDE = """
import torch, gradwise as gw
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
compiled = torch.compile(model)
with gw.watch():  # the process's first compile happens while gw.watch() wraps torch.autograd.grad
    for n in (4, 6, 5):
        model.zero_grad()
        compiled(torch.randn(n, 4)).square().mean().backward()
torch._dynamo.reset()
lin = torch.nn.Linear(4, 1)
x = torch.cat([torch.randn(4, 4), torch.full((2, 4), float("nan"))])


@torch.compile(backend="aot_eager")
def step(x):
    loss = lin(x)[:4].square().mean()
    lin.weight.grad = gw.grad(loss, lin.weight)[0]
    return loss


with gw.strong_zeros():
    step(x)
print(bool(lin.weight.grad.isfinite().all()))
"""


def test_a_first_compile_inside_watch_leaves_dynamo_as_it_was(tmp_path):
    """Dynamo builds its table of handlers for torch functions (keyed by identity) on first use: built during a
    first compile inside gw.watch() (or gw.trace()), it knew gradwise's wrapper of torch.autograd.grad only, and
    every later compiled function calling gw.grad traced the real one into its graph ('The differentiated Tensor
    ... appears to not have been used in the graph'): seen as a test order that failed. A fresh process."""
    script = tmp_path / "first_compile.py"
    script.write_text(_FIRST_COMPILE_INSIDE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(gw.__file__).parents[1])})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


def test_an_unreplayable_step_is_the_root_cause_not_the_parameters_it_made_nan():
    """A compiled backward with donated buffers keeps no graph: gw.watch() cannot replay the step whose
    gradients came out NaN (padding sliced away: contamination), and the optimizer then writes that NaN into the
    parameters. The following steps' NaN comes from the parameters: it was reported as a genuine NaN born of
    data that 'arrived non-finite' at the optimizer's line (a NaN .grad taken for an input), with 'clean the data'
    as the fix. The unexplained step is the root cause (not classified, with gw.trace() as the advice) and the
    later steps are downstream of it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, on the compiler's first import
        compiled = torch.compile(model)
        with gw.watch() as report:
            for step in range(5):
                x = torch.randn(6, 4)
                if step == 2:
                    x[5] = float("nan")  # sliced away below
                loss = compiled(x)[:5].pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    torch._dynamo.reset()
    assert "could not be explained" in report.notes[0], report.notes
    roots = [f for f in report.findings if not f.downstream]
    assert len(roots) == 1 and roots[0].step == 2 and roots[0].born_op == "backward", str(report)
    assert "not known" in roots[0].message and "gw.trace()" in roots[0].fix, str(report)
    assert sorted(roots[0].reaches) == sorted(n for n, _ in model.named_parameters()) or roots[0].reaches, str(report)
    assert all(f.born_op != "input" for f in report.findings), str(report)
    assert [f.downstream for f in report.findings if f is not roots[0]] and all(
        f.downstream for f in report.findings if f is not roots[0]), str(report)
    (cause,) = report.causes
    assert cause.startswith("root cause at step 2") and "later step" in cause, cause


def _loader_run(ctx, case: str, clip: bool = False):
    """Six batches of 4 sequences of 5 tokens from a DataLoader; batch 3 brings a NaN (``used``: in a token the
    loss reads, ``pad``: in the last token, which it slices away; ``saved``: as ``used``, read by a linear layer
    that saves it for its backward, where ``used`` adds a position embedding first, which saves neither operand;
    ``bf16``: as ``saved`` under autocast, which saves a bf16 copy) or makes one (``log``: a log of negatives)."""
    torch.manual_seed(0)
    data = torch.randn(24, 5, 4)
    if case in ("used", "saved", "bf16"):
        data[13, 1, 2] = float("nan")
    elif case == "pad":
        data[13, 4, 2] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    lin, out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    pos = torch.nn.Parameter(torch.randn(5, 4))
    params = [*lin.parameters(), *out.parameters(), pos]
    opt = torch.optim.SGD(params, lr=0.1)
    with ctx() as report:
        for step, (x,) in enumerate(loader):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16"):
                h = lin(x) if case in ("saved", "bf16") else lin(torch.layer_norm(x + pos, (4,)))
                y = out(torch.tanh(h))[:, :4].float()
            if case == "log":
                y = torch.log(y + 200.0 - 300.0 * (step == 3))
            y.pow(2).mean().backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
    return report


def _origins(report) -> list[tuple]:
    """The findings that are no consequence of another: kind, where born, how many, when, and for data the
    sentence naming it (not the line: the watch sees the backward call's only)."""
    return [(f.kind, f.born_op, f.count, f.step, f.born.split(" (first used")[0] if f.born_op == "input" else None)
            for f in report.findings if not f.downstream]


@pytest.mark.parametrize("case", ["used", "pad", "saved", "bf16", "log"])
def test_the_explained_step_is_born_where_gw_trace_says(case):
    """The step gw.watch() explains by replaying its backward met the graph's saved values last-computed first,
    each a birth of its own ('arrived non-finite'): the root cause was a layer's output (tensor[20, 1]), the data
    was listed among the NaN no gradient used (padding that contaminated), and DataLoader batches were not tagged
    (only a running trace tagged them). The births are now made in the forward's order, derived values carry
    their inputs' births, and the data is named with its batch, as gw.trace() of the same program names it."""
    watched, traced = _loader_run(gw.watch, case), _loader_run(gw.trace, case)
    assert _origins(watched) == _origins(traced), f"{watched}\n---\n{traced}"
    assert watched.unused == traced.unused == [], f"{watched}\n---\n{traced}"
    (cause,) = watched.causes
    born = {"log": "aten.log at "}.get(case, "x arrived with 1 NaN value(s) in DataLoader batch 3")
    assert cause.startswith(f"root cause at step 3: {born}"), cause


def test_a_clipped_step_tells_each_line_that_used_the_gradient_once():
    """clip_grad_norm_ reads the NaN gradient and writes NaN into every gradient, then the optimizer writes them
    into the parameters: the next steps' outputs inherit both lines' NaN, the backward's findings name the first.
    The optimizer's line was a finding of its own, 'the output depends on it' with 'reaches: no gradient', and a
    downstream finding said 'first at step 4' beside a cause that says the line wrote it at step 3. The cause now
    tells both lines at step 3 and every downstream finding starts there (gw.trace() and gw.watch() alike)."""
    for ctx in (gw.watch, gw.trace):
        report = _loader_run(ctx, "pad", clip=True)
        (cause,) = report.causes
        assert "read it and wrote NaN/Inf into the other gradients at step 3" in cause, cause
        assert "then " in cause and "wrote the non-finite gradient into the parameters at step 3" in cause, cause
        assert all(f.reaches for f in report.findings), str(report)
        assert [f.step for f in report.findings if f.downstream] == [3], str(report)


def _cause_of_a_nan_step(ctx, after_backward, steps: int, nan_at: int, rows: int) -> str:
    """The one cause of a loop whose batch at step ``nan_at`` brings a NaN the loss reads; ``after_backward(loss)``
    runs between each backward and its optimizer step (a framework's bookkeeping)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with ctx() as report:
        for step in range(steps):
            x = torch.randn(rows, 4)
            if step == nan_at:
                x[1, 2] = float("nan")
            loss = lin(x).square().mean()
            loss.backward()
            after_backward(loss)
            opt.step()
            opt.zero_grad()
    (cause,) = report.causes
    return cause


@pytest.mark.parametrize("ctx", [gw.watch, gw.trace])
def test_detaching_the_loss_after_backward_starts_no_step(ctx):
    """Lightning detaches the loss after its backward, in grad mode, before the optimizer steps (its precision
    plugin's post_backward): that op started the next step, so the cause said the optimizer wrote the NaN gradient
    into the parameters at step 4 for the backward of step 3. Reading the loss the backward differentiated starts
    no step, as reading the gradients does not."""
    cause = _cause_of_a_nan_step(ctx, lambda loss: loss.detach(), steps=5, nan_at=3, rows=3)
    assert cause.startswith("root cause at step 3") and "into the parameters at step 3" in cause, cause


@pytest.mark.parametrize("ctx", [gw.watch, gw.trace])
def test_a_running_loss_starts_no_step(ctx):
    """Hugging Face's Trainer adds each step's detached loss to a running total of earlier steps
    (``tr_loss + loss.detach()``) after the backward, before the optimizer steps: the total is no output of this
    backward, so the add started the next step and the cause said the optimizer wrote the NaN gradient into the
    parameters at step 3 for the backward of step 2. Bookkeeping that reads what the backward left and nothing
    that requires grad starts no step."""
    total = [torch.zeros(())]
    cause = _cause_of_a_nan_step(ctx, lambda loss: total.append(total.pop() + loss.detach()), steps=4, nan_at=2,
                                 rows=8)
    assert cause.startswith("root cause at step 2") and "into the parameters at step 2" in cause, cause


def test_the_trace_holds_no_graph_after_a_second_backward():
    """Between backwards the trace notes the outputs the backward differentiated (Lightning detaches its loss after
    the backward, which starts no step): held strongly, the output kept its whole graph alive after the program let
    it go (PyTorch's test_hook_closure_cycle and nested checkpoint tests under the trace)."""
    import gc
    import weakref

    class Marker:
        pass

    def scope():
        a = torch.tensor(1.0, requires_grad=True)
        b = a.clone()
        marker = Marker()
        b.grad_fn.metadata["marker"] = marker
        return b.clone(), weakref.ref(marker)

    with gw.trace():
        out, ref = scope()
        out.backward(retain_graph=True)
        out.backward(retain_graph=True)  # its seed, ones_like(out), reads the output between backwards
        del out
        gc.collect()
        assert ref() is None


def _python_calls_in_a_finite_watched_backward(depth: int) -> int:
    """Python functions entered by one watched backward of a finite step through ``depth`` Linear+ReLU layers
    (after a first step: the per-node-type tables are filled)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(depth) for m in (torch.nn.Linear(4, 4), torch.nn.ReLU())])
    x = torch.randn(3, 4)
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code.co_name)

    with gw.watch() as report:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        loss = model(x).sum()
        sys.setprofile(profile)
        try:
            loss.backward()
        finally:
            sys.setprofile(None)
    assert not report.findings
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return len(calls)


@pytest.mark.parametrize("compiled_before", [False, True])
def test_a_finite_watched_step_makes_no_python_call_per_node_or_gradient(compiled_before):
    """The watch's per-step work (its walk of the graph, the gradient check, the release of the kept graph) is
    the cost of a finite step: it must not call Python per autograd node or per gradient (a helper per node
    was most of a small model's 1.3x), so 4x the layers make the same calls; also once something was compiled
    in the process (the search for compiled backwards that refuse a kept graph was a second walk per step)."""
    if compiled_before:
        x = torch.randn(3, requires_grad=True)
        torch.compile(lambda t: (t * 2).sin(), backend="aot_eager")(x).sum().backward()
    assert _python_calls_in_a_finite_watched_backward(2) == _python_calls_in_a_finite_watched_backward(8)


def test_a_finite_step_without_fsdp2_does_not_look_for_it():
    """The FSDP2 path (`_fsdp_watching`: its parameters' sharded gradients) costs a program without FSDP2 nothing,
    FSDP2 imported or not: every leaf the backward reached holds a gradient, so it is never entered (but once per
    block, before its first backward, for gradients that were not zeroed)."""
    import torch.distributed.fsdp

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith("_fsdp_watching.py"):
            entered.append(frame.f_code.co_name)

    with gw.watch() as report:
        model(torch.randn(3, 4)).sum().backward()
        sys.setprofile(profile)
        try:
            model(torch.randn(3, 4)).sum().backward()
        finally:
            sys.setprofile(None)
    assert entered == [] and len(report) == 0 and not report.notes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (5000,)])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_gradient_check_finds_one_nonfinite_element_and_no_large_finite_one(dtype, shape, bad):
    """Reference: torch.isfinite of the gradients. Beside the leaf under test, small float32 vectors (summed
    together) and a float16 gradient whose float16 sum would overflow (finite: no alarm)."""
    w = torch.ones(shape, dtype=dtype, requires_grad=True)
    coef = torch.full(shape, 0.5, dtype=dtype)
    if bad is not None:
        coef.view(-1)[-1] = bad
    vectors = [torch.ones(4, requires_grad=True) for _ in range(5)]
    half = torch.ones(4096, dtype=torch.float16, requires_grad=True)
    with gw.watch() as report:
        # (the half product summed in float32: a float16 sum of it overflows, and the loss would be Inf)
        loss = (w * coef).sum().float() + sum(v.sum() for v in vectors) + (half * 60000.0).float().sum()
        loss.backward()
    grads = [w.grad, half.grad, *(v.grad for v in vectors)]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    assert finite == (bad is None)
    assert bool(report.findings) == (not finite)


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("ctx", ["watch", "trace", "strong_zeros"])
def test_a_finite_step_raises_no_error_inside_gradwise(ctx, checkpointed):
    """An error raised by PyTorch's C++ and caught in Python costs ~30 us (c10::Error records a backtrace), a
    twentieth of a small model's step, and no profiler shows it: a finite step raises none inside gradwise.
    (The watch's release hooked every saved slot, and addmm's ``mat2`` is saved as None when the batch needs no
    gradient: one refused call per step; and every slot a checkpoint had hooked.)"""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    model = (lambda t: torch.utils.checkpoint.checkpoint(layers, t, use_reentrant=False)) if checkpointed else layers
    x = torch.randn(3, 4)
    enter = {"watch": gw.watch, "trace": gw.trace, "strong_zeros": gw.strong_zeros}[ctx]
    raised = []

    def tracer(frame, event, arg):
        if event == "exception" and "gradwise" in frame.f_code.co_filename:
            tb = arg[2]
            while tb.tb_next is not None:
                tb = tb.tb_next
            # raised here or by what gradwise called; not PyTorch's own control flow passing through a wrapper
            # (the checkpoint's _StopRecomputationError, raised and caught by torch.utils.checkpoint)
            if "gradwise" in tb.tb_frame.f_code.co_filename:
                raised.append((frame.f_code.co_name, arg[0].__name__, str(arg[1])[:80]))
        return tracer

    with enter():
        model(x).sum().backward()
        layers.zero_grad(set_to_none=True)
        loss = model(x).sum()
        sys.settrace(tracer)
        try:
            loss.backward()
        finally:
            sys.settrace(None)
    assert all(torch.isfinite(p.grad).all() for p in layers.parameters())
    assert not raised, raised
