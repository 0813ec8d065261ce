"""Hunt for defects in the explanation features (gw.trace, gw.watch, the report): realistic scenarios whose ground
truth is built into the program (which line made the NaN/Inf, which .grad holds it)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import gradwise as gw


def _nonfinite_grads(named) -> set[str]:
    return {name for name, p in named if p.grad is not None and not bool(p.grad.isfinite().all())}


def _two_layers():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)


@pytest.mark.parametrize("block", [gw.trace, gw.watch])
def test_a_gradient_not_zeroed_since_a_nan_backward_outside_the_block_is_named(block):
    """A notebook's second look: a backward outside the block left NaN in .grad (x had a NaN), x is fixed and the
    next backward runs under gw.trace() / gw.watch() without zero_grad. Every gradient it adds to stays NaN. The
    NaN arrived with the .grad: it was not made by the accumulation (the trace said "the backward of
    AccumulateGrad made NaN from finite values (an infinite derivative used)") and the watch, which saw the
    non-finite .grad at step 0, explained nothing."""
    lin, lin2 = _two_layers()
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    lin2(lin(x)).sum().backward()  # outside the block
    x[0, 0] = 1.0
    with block() as report:
        for _ in range(2):
            lin2(lin(x)).sum().backward()  # finite gradients, added to the NaN ones
    named = [*lin.named_parameters(prefix="lin"), *lin2.named_parameters(prefix="lin2")]
    bad = _nonfinite_grads(named)
    assert bad == {"lin.weight", "lin2.weight"}  # the ground truth: the biases' gradients stayed finite
    assert len(report.findings) == 1, str(report)
    f = report.findings[0]
    assert (f.kind, f.op, f.step, f.downstream) == ("nan", "input", 0, False)
    assert set(f.reaches) == bad
    assert "lin.weight.grad" in f.born and "lin2.weight.grad" in f.born and "infinite derivative" not in f.born
    assert "zero_grad" in f.fix


def test_a_stale_gradient_accumulated_out_of_place_is_no_gradient_used_as_a_value():
    """With create_graph=True AccumulateGrad adds out of place (.grad = .grad + new): the old NaN .grad is
    carried into the new one, not a NaN gradient 'used as a value' by the backward itself."""
    lin, lin2 = _two_layers()
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    lin2(lin(x)).sum().backward()
    x[0, 0] = 1.0
    with pytest.warns(UserWarning, match="create_graph=True"), gw.trace() as report:
        lin2(lin(x)).sum().backward(create_graph=True)
    assert [(f.kind, f.op, f.downstream) for f in report.findings] == [("nan", "input", False)], str(report)
    assert set(report.findings[0].reaches) == {"lin.weight", "lin2.weight"}


def test_a_learning_rate_too_high_is_told_as_overflows_not_as_a_domain_error():
    """A learning rate too high: the squared error overflows to Inf (pow of finite values above sqrt(largest
    float32)) and SGD's update then overflows the parameters (add_ of finite values). Both births are overflows;
    pow's was told as a domain error ("64 negative and 0 zero base(s): NaN for a negative base, inf for a
    negative power of 0", with the domain fix "keep the base inside the domain") and add_'s as "made NaN/Inf from
    finite inputs" with no fix."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=50.0)
    x, y = torch.randn(64, 4) * 10, torch.randn(64, 1)
    losses = []
    with gw.trace() as report:
        for _ in range(4):
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[2] == float("inf") and all(abs(v) < float("inf") for v in losses[:2])  # the ground truth
    births = {f.born_op: f for f in report.findings if f.born_op in ("aten.pow", "aten.add_")}
    assert set(births) == {"aten.pow", "aten.add_"}, str(report)
    for f in births.values():
        assert "overflow: the result exceeds the largest float32" in f.born, f.born
        assert "negative" not in f.born and "avoid the overflow" in f.fix, (f.born, f.fix)
    assert births["aten.pow"].step == 2


@pytest.mark.parametrize(("exponent", "says"), [
    (torch.tensor([2.0, 2.0, 2.0]), "overflow"),
    (torch.tensor([0.5, 0.5, 0.5]), "1 negative and 0 zero base(s)"),
    (torch.tensor([2.0, 0.5, -1.0]), "1 negative and 1 zero base(s)"),
])
def test_a_power_tells_each_of_its_non_finite_values_why(exponent, says):
    """pow's NaN/Inf from finite values: a negative base to a fractional power, a negative power of 0, or an
    overflow; each is named by what the base and result hold there."""
    w = torch.tensor([1e20, -2.0, 0.0], requires_grad=True)
    with gw.trace() as report:
        (w ** exponent).sum().backward()
    (f,) = [f for f in report.findings if f.born_op == "aten.pow"]
    assert says in f.born, f.born
    assert ("1 overflow(s)" in f.born) == (says.startswith("1 negative and 1")), f.born


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


@pytest.mark.parametrize("workers", [0, 2])
def test_a_nan_made_in_the_block_and_sent_through_dataloader_workers_is_not_called_unused(workers):
    """A dataset built inside the traced block (as under `gradwise run`) with a NaN row, read through a DataLoader.
    Without workers the trace follows the collate: the NaN is born at its line. With worker processes the batch
    arrives through shared memory and is named as DataLoader data; the line that made the NaN was then listed
    under "Not errors: ... no gradient used", a false statement about the root cause: it is a note instead."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    with gw.trace() as report:
        data = torch.randn(16, 4)
        data[5] = float("nan")  # batch 1 (batches of 4)
        for (xb,) in DataLoader(TensorDataset(data), batch_size=4, num_workers=workers):
            lin(xb).sum().backward()
    assert not lin.weight.grad.isfinite().all()  # the ground truth: the NaN row reached the gradient
    (f,) = report.findings
    assert f.kind == "nan" and "lin.weight" in f.reaches, str(report)
    assert not any("fill_" in u for u in report.unused), report.unused
    if workers:
        assert "DataLoader batch 1" in f.born
        assert any("worker processes" in n and "aten.fill_ at" in n for n in report.notes), report.notes
    else:
        assert f.born_op == "aten.fill_"


def test_a_gradient_a_clip_made_nan_has_the_step_it_happened_at():
    """clip_grad_norm_ with a NaN total norm scales the one finite gradient by NaN: its finding said step None
    (JSON "step": null, and no "first at step" in the text) where every other finding has the step it first
    happened at; the clip after backward 0 is step 0, as the update's "gradient used as a value" birth says."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(6, 4)
    x[4:] = float("nan")
    with gw.trace() as report:
        model(x)[:4].sum().backward()
        finite = {n for n, p in model.named_parameters(prefix="model") if p.grad.isfinite().all()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert finite == {"model.2.bias"}  # the ground truth: the only gradient the backward left finite
    (clip,) = [f for f in report.findings if f.op == "aten._foreach_mul_"]
    assert set(clip.reaches) == finite and clip.step == 0, str(report)


def test_the_untraced_threads_count_stays_bounded_with_a_thread_per_step():
    """`gradwise run`'s count of backward calls in threads it does not trace (a server's thread per request):
    the first few thread names are kept apart, the rest counted together; a thread that traces is not counted."""
    import threading

    from gradwise._trace import _session

    lin = torch.nn.Linear(2, 1)

    def step(traced):
        if traced:
            with gw.trace():
                lin(torch.randn(3, 2)).sum().backward()
        else:
            lin(torch.randn(3, 2)).sum().backward()

    with gw.trace(), _session.untraced_threads() as untraced:
        for i in range(20):
            t = threading.Thread(target=step, args=(i == 0,), name=f"t{i}")
            t.start()
            t.join()
    assert len(untraced) == _session._UNTRACED_NAMES + 1 and "t0" not in untraced
    assert sum(untraced.values()) == 19 and untraced["other threads"] == 19 - _session._UNTRACED_NAMES


def test_a_gradient_that_overflows_in_the_backward_is_told_as_an_overflow():
    """fp16 autocast with torch.amp.GradScaler's loss scale too large: the scaled gradient overflows float16 in
    the backward of autocast's cast (GradScaler then skips the step and lowers the scale). It was told as "the
    backward of aten._to_copy made Inf from finite values (an infinite derivative used)" with no fix; a cast or
    a product of finite values can only overflow."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    x, y = torch.randn(32, 16) * 30, torch.randn(32, 1)
    with gw.trace() as report:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        bad = {n for n, p in model.named_parameters(prefix="model") if not p.grad.isfinite().all()}
        scaler.step(opt)
        scaler.update()
    assert bad and scaler.get_scale() < 2.0**40  # the ground truth: Inf gradients, the step skipped
    (f,) = report.findings
    assert f.kind == "inf" and set(f.reaches) == bad, str(report)
    assert "overflowed in aten._to_copy" in f.born and "float16" in f.born and "infinite derivative" not in f.born
    assert "GradScaler" in f.fix
    # a product in the backward of finite values (a seed of 1e20 times a weight of 1e20): the same
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with gw.trace() as report:
        (w * 1e20).sum().backward(torch.tensor(1e20))
    (f,) = report.findings
    assert "overflowed in aten.mul" in f.born and "float32" in f.born, str(report)


def test_the_watch_names_the_discarding_op_and_the_nodes_op_as_the_trace_does():
    """An Inf input row whose target is ignore_index (cross_entropy): contamination, unused since nll_loss. The
    watch names the forward op of each node from its autograd name; NllLossBackward0 became aten.nll_loss (a
    composite op the trace never sees: it records aten.nll_loss_forward) and LogSoftmaxBackward0
    aten.log_softmax, so the watch's finding had no "unused since" and named another op than gw.trace()'s."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    x[3] = float("inf")
    y = torch.tensor([0, 1, 2, -100, 1])
    got = {}
    for block in (gw.trace, gw.watch):
        model.zero_grad()
        with block() as report:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        (f,) = report.findings
        got[block] = (f.kind, f.op, f.discarded_op, f.message, set(f.reaches))
    assert got[gw.watch] == got[gw.trace], got
    assert got[gw.watch][2] == "aten.nll_loss_forward" and "aten._log_softmax)" in got[gw.watch][3]
    assert got[gw.watch][4] == {n for n, p in model.named_parameters(prefix="model") if not p.grad.isfinite().all()}


def test_a_subclass_that_overrides_nothing_is_read_as_a_plain_tensor():
    """Data tagged with a subclass that overrides neither __torch_dispatch__ nor __torch_function__
    (x.as_subclass(Tagged)): its values are a plain tensor's, but the trace passed them over, so the contamination
    they caused was 'born: 0/0 or 0 x Inf in aten.mul' (no NaN there is 0/0) with no note. Subclasses with their
    own dispatch keep being passed over (tests/test_trace.py)."""

    class Tagged(torch.Tensor):
        pass

    w = torch.tensor([0.5, 1.5, 2.5], requires_grad=True)
    x = torch.tensor([1.0, 2.0, float("nan")]).as_subclass(Tagged)
    with gw.trace() as report:
        (w * x)[:2].sum().backward()
    assert not w.grad.isfinite().all()  # the ground truth: the sliced-away NaN reached w's gradient
    (f,) = report.findings
    assert f.kind == "contamination" and f.reaches == ["w"] and f.born_op == "input", str(report)
    assert "arrived with 1 NaN value(s)" in f.born, f.born


# `grad`/`backward` bound before the trace began (`from torch.autograd import grad` at a module's top): PyTorch's own
# functions, not the trace's wrappers. Taken at this module's import, as such code does.
_EARLY_GRAD, _EARLY_BACKWARD = torch.autograd.grad, torch.autograd.backward


def _contaminated_program():
    x = torch.tensor([4.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([2.0, -3.0], dtype=torch.float64, requires_grad=True)
    y = torch.where(x > 0, x.sqrt(), 0.0) * (h * 1.0).sum()
    return x, h, y.sum()


def _grad_call(late: bool, x, y):
    return (torch.autograd.grad if late else _EARLY_GRAD)(y, x)[0]  # (one line: the same user line either way)


def _backward_call(late: bool, x, y, **kwargs):
    (torch.autograd.backward if late else _EARLY_BACKWARD)(y, **kwargs)
    return x.grad


_BACKWARD_CALLS = {  # name -> call(late, x, y), returning x's gradient
    "grad": _grad_call,
    "backward": _backward_call,
    "backward(inputs=)": lambda late, x, y: _backward_call(late, x, y, inputs=[x]),
}


def _findings(report) -> list:
    return [dataclasses.asdict(f) for f in report.findings]


@pytest.mark.parametrize("strong", [False, True], ids=["plain", "strong_zeros"])
@pytest.mark.parametrize("block", ["trace", "watch"])
@pytest.mark.parametrize("name", list(_BACKWARD_CALLS))
def test_early_bound_grad_is_read_like_torch_autograd_grad(name, block, strong):
    """A backward started by a `grad`/`backward` bound before the block (PyTorch's own function) was counted by the
    trace as an untraced backward with no finding ("may hold NaN/Inf", the NaN listed as used by no traced
    gradient), and gw.watch() did not see it at all ("No NaN/Inf gradients" of a NaN gradient). Now the engine hook
    hands it to the block: the same report as through torch.autograd.grad, nothing untraced; under strong zeros the
    same annihilation."""
    call = _BACKWARD_CALLS[name]
    got = {}
    for bound in ("late", "early"):
        with getattr(gw, block)() as report, gw.strong_zeros() if strong else contextlib.nullcontext():
            x, _, y = _contaminated_program()
            grad = call(bound == "late", x, y)
        got[bound] = (_findings(report), report.untraced_backwards, str(report), grad)
    (late_findings, late_untraced, late_text, late_grad) = got["late"]
    assert late_untraced == 0 and bool(late_grad[2].isnan()) != strong  # the premise
    if not strong:
        assert [f["kind"] for f in late_findings] == ["contamination"]
    elif block == "trace":
        assert not late_findings and "Removed by gw.strong_zeros()" in late_text
    assert got["early"][:3] == (late_findings, 0, late_text), got["early"][2]
    assert torch.equal(got["early"][3].nan_to_num(7.0), late_grad.nan_to_num(7.0))  # PyTorch's / strong zeros'


_EARLY_UNTRACED = {  # an early-bound grad the blocks cannot read: counted once, as through torch.autograd.grad
    "is_grads_batched": lambda: _EARLY_GRAD((x := torch.tensor([4.0, -1.0], requires_grad=True)).sqrt(), x,
                                            torch.eye(2), is_grads_batched=True)[0],
    "inside torch.func.grad": lambda: torch.func.grad(lambda x: _EARLY_GRAD(
        torch.where(x > 0, x.sqrt(), 0.0).sum(), x, create_graph=True)[0].sum())(torch.tensor([4.0, -1.0])),
}


@pytest.mark.parametrize("block", ["trace", "watch"])
@pytest.mark.parametrize("name", list(_EARLY_UNTRACED))
def test_early_bound_grad_the_block_cannot_read_is_counted(name, block):
    """Batched seeds or a torch.func transform: not read, counted as untraced (the watch, handed such a backward by
    the engine hook, must neither read batched seeds, "Batching rule not implemented for aten::item", nor hand the
    same backward over again from inside its own call: a RecursionError)."""
    expected = _EARLY_UNTRACED[name]()
    with getattr(gw, block)() as report:
        got = _EARLY_UNTRACED[name]()
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)) and bool(got.isnan().any())
    assert report.untraced_backwards >= 1 and "may hold NaN/Inf" in report.summary()


def test_early_bound_grad_of_a_genuine_nan_is_genuine():
    """Control: a NaN the output uses, through an early-bound grad: a genuine finding, as through the wrapper."""
    with gw.trace() as report:
        x = torch.tensor([4.0, -1.0], requires_grad=True)
        _EARLY_GRAD(x.sqrt().sum(), x)
    assert [f.kind for f in report.findings] == ["nan"] and report.untraced_backwards == 0, str(report)


@pytest.mark.parametrize(("base", "exponent", "said", "not_said"), [
    (10.0, 400.0, "a base above 1 in magnitude raised to a large power", "0 to a negative power"),
    (-10.0, 400.0, "a base above 1 in magnitude raised to a large power", "0 to a negative power"),
    (0.5, -400.0, "a base below 1 in magnitude raised to a large negative power", "above 1"),
    (0.0, -1.0, "0 to a negative power", "above 1"),
])
def test_scalar_base_power_inf_is_named_for_what_made_it(base, exponent, said, not_said):
    """c ** x made Inf: the birth said "overflow ..., or 0 to a negative power" for 10.0 ** 400, whose base is not 0.
    The exponents' sign tells an overflow of a base above 1 from a negative power (of 0, or of a base below 1)."""
    with gw.trace() as report:
        x = torch.tensor([1.0, exponent], requires_grad=True)
        (base ** x).sum().backward()
    (finding,) = [f for f in report.findings if f.kind == "inf"]  # (-10 ** x: its backward's log(-10) is NaN too)
    assert said in finding.born and not_said not in finding.born, finding.born
