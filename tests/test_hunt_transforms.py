"""Strong zeros and the trace where PyTorch transforms or captures the program: torch.func, batched gradients,
TorchScript, torch.export, forward-mode AD, hooks, saved-tensor hooks and threads.

References are independent of gradwise: the same program with the unused values deleted (float64), PyTorch's own
gradient on finite data (bitwise), and PyTorch's NaN where a NaN is genuine.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _script

nan = float("nan")


def _contaminated(x: torch.Tensor) -> torch.Tensor:
    """sqrt of a negative entry that where() discards: the gradient there is NaN in plain PyTorch, 0 once deleted."""
    return torch.where(x > 0, x.sqrt(), 0.0).sum()


def _genuine(x: torch.Tensor) -> torch.Tensor:
    """sqrt of a negative entry that the output uses: a genuine NaN gradient."""
    return x.sqrt().sum()


_X = torch.tensor([4.0, 1.0, -1.0], dtype=torch.float64)

# gradients computed by a backward that runs under a torch.func transform or with batched seeds: the trace
# cannot read them
_UNTRACED = {
    "func.grad genuine": lambda: torch.func.grad(_genuine)(_X),
    "func.grad contaminated": lambda: torch.func.grad(_contaminated)(_X),
    "vmap(grad)": lambda: torch.func.vmap(torch.func.grad(_contaminated))(_X.expand(2, 3)),
    "jacrev": lambda: torch.func.jacrev(lambda x: torch.where(x > 0, x.sqrt(), 0.0))(_X),
    "hessian": lambda: torch.func.hessian(_contaminated)(_X),
    "is_grads_batched": lambda: torch.autograd.grad(
        (x := _X.clone().requires_grad_()).sqrt(), x, torch.eye(3, dtype=x.dtype), is_grads_batched=True)[0],
}


@pytest.mark.parametrize("name", list(_UNTRACED))
def test_trace_never_calls_an_untraced_gradient_clean(name):
    """The gradient holds NaN (PyTorch's, the reference), which the trace could not read: its report said "No NaN/Inf
    gradients and no kinks found" and listed the NaN the gradient used under "Not errors ... no gradient used"."""
    call = _UNTRACED[name]
    expected = call()
    assert bool(expected.isnan().any())  # the premise: the gradient is not clean
    with gw.trace() as report:
        got = call()
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))  # the trace changes no gradient
    assert "untraced" in report.summary() and "may hold NaN/Inf" in report.summary()
    assert "Not errors" not in str(report)
    assert report.untraced_backwards >= 1
    assert json.loads(report.to_json())["untraced_backwards"] == report.untraced_backwards


def test_traced_backward_after_an_untraced_one_is_still_explained():
    """An untraced backward in the block does not hide what a traced one finds (and the summary names both)."""
    with gw.trace() as report:
        torch.func.grad(_genuine)(_X)
        x = _X.clone().requires_grad_()
        _contaminated(x).backward()
    assert [f.kind for f in report.findings] == ["contamination"]
    assert report.untraced_backwards == 1 and "1 backward call ran untraced" in report.summary()


def test_nested_block_counts_only_its_own_untraced_backwards():
    with gw.trace() as outer:
        torch.func.grad(_genuine)(_X)
        with gw.trace() as inner:
            x = _X.abs().requires_grad_()
            _genuine(x).backward()
    assert outer.untraced_backwards == 1 and inner.untraced_backwards == 0
    assert inner.summary().startswith("No NaN/Inf gradients and no kinks found (")


def test_plain_backward_report_unchanged():
    """Control: nothing untraced, the usual summary and 'Not errors' line."""
    with gw.trace() as report:
        x = _X.clone().requires_grad_()
        torch.where(x > 0, x, 0.0).sum().backward()
        _X.sqrt()  # a NaN nothing differentiates
    assert report.untraced_backwards == 0 and "untraced_backwards" not in json.loads(report.to_json())
    assert report.summary().startswith("No NaN/Inf gradients and no kinks found (")
    assert "Not errors" in str(report)


# ---------------------------------------------------------------------------------------------------------
# Strong zeros where the program is captured or hooked (cases the other files do not cover)
# ---------------------------------------------------------------------------------------------------------

def _body(lin: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(lin(x.sqrt()))


def _setup():
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2).double()
    x = torch.tensor([[1.0, 4.0], [-1.0, 2.0], [9.0, 1.0]], dtype=torch.float64)
    clean = x.clone().requires_grad_()
    _body(lin, clean[[0, 2]]).sum().backward()  # the same program with row 1 deleted
    lin.zero_grad()
    return lin, x, clean.grad


def test_hook_that_replaces_the_gradient_makes_the_nan_genuine():
    """A tensor hook returning a fresh all-ones gradient: every element is used now, so sqrt(-1)'s NaN must stay."""
    x = torch.tensor([1.0, 4.0, -1.0], dtype=torch.float64, requires_grad=True)

    def program():
        h = x.sqrt()
        h.register_hook(lambda g: torch.ones_like(g))
        return h[:2].sum()

    expected = torch.autograd.grad(program(), x)[0]
    got = gw.grad(program(), x)[0]
    assert bool(got[2].isnan()) and torch.equal(got[:2], expected[:2])


_FRESH_HOOKS = {  # a gradient hook returning a tensor of fresh random values, drawn from g's shape only
    "randn_like": torch.randn_like,
    "rand_like": torch.rand_like,
    "randint_like": lambda g: torch.randint_like(g, 1, 5),
    "clone().normal_()": lambda g: g.clone().normal_(),
    "clone().uniform_()": lambda g: g.clone().uniform_(),
}


@pytest.mark.parametrize("name", sorted(_FRESH_HOOKS))
def test_hook_returning_fresh_random_values_makes_the_nan_genuine_silently(name):
    """A hook returning torch.randn_like(g): every element carries a value now, so sqrt(-1)'s NaN is used (PyTorch's
    NaN stays, as for ones_like). gw gave an OpaqueBackwardWarning ("randn_like has no strong-zero rule ... may be
    contamination"): wrong, randn_like reads only the shape; it is a creation of values, like ones_like."""
    x = torch.tensor([1.0, 4.0, -1.0], dtype=torch.float64, requires_grad=True)
    hook = _FRESH_HOOKS[name]

    def program():
        h = x.sqrt()
        h.register_hook(hook)
        return h[:2].sum()

    torch.manual_seed(0)
    expected = torch.autograd.grad(program(), x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.GradwiseWarning)
        torch.manual_seed(0)
        got = gw.grad(program(), x)[0]
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)) and bool(got[2].isnan())


def test_post_accumulate_and_multi_grad_hooks_see_the_strong_gradient_once():
    lin, x0, expected = _setup()
    x = x0.clone().requires_grad_()
    post, multi = [], []
    x.register_post_accumulate_grad_hook(lambda p: post.append(p.grad.clone()))
    h = _body(lin, x) * 1
    torch.autograd.graph.register_multi_grad_hook((x, h), lambda gs: multi.append(gs[0].clone()))
    with gw.strong_zeros():
        h[[0, 2]].sum().backward()
    assert len(post) == 1 and len(multi) == 1
    assert torch.equal(post[0], expected) and torch.equal(multi[0], expected) and torch.equal(x.grad, expected)


@pytest.mark.parametrize("hooks", ["save_on_cpu", "numpy_pack"])
def test_saved_tensor_hooks(hooks):
    """Saved tensors packed away (to CPU, to NumPy arrays) and unpacked in the backward; the reference is the
    deleted program under the same hooks (NumPy's copies change PyTorch's last bits by themselves)."""
    lin, x0, _ = _setup()

    def hooked():
        return torch.autograd.graph.save_on_cpu() if hooks == "save_on_cpu" else \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().numpy().copy(), torch.from_numpy)

    clean = x0.clone().requires_grad_()
    with hooked():
        out = _body(lin, clean[[0, 2]]).sum()
    (expected,) = torch.autograd.grad(out, clean)
    x = x0.clone().requires_grad_()
    with hooked():
        out = _body(lin, x)[[0, 2]].sum()
    with gw.strong_zeros():
        out.backward()
    assert torch.equal(x.grad, expected)


def test_two_threads_one_strong_one_plain():
    lin, x0, expected = _setup()
    grads: dict[str, torch.Tensor] = {}
    barrier = threading.Barrier(2)

    def worker(name: str, strong: bool) -> None:
        barrier.wait()
        for _ in range(10):
            x = x0.clone().requires_grad_()
            out = _body(lin, x)[[0, 2]].sum()
            grads[name] = gw.grad(out, x)[0] if strong else torch.autograd.grad(out, x)[0]

    threads = [threading.Thread(target=worker, args=("strong", True)),
               threading.Thread(target=worker, args=("plain", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(grads["strong"], expected)
    assert bool(grads["plain"][1].isnan().all())  # the plain thread keeps PyTorch's contamination


class _TanhSqrt(torch.nn.Module):
    """tanh(lin(sqrt(x))): the module scripted and exported below."""

    def __init__(self, lin: torch.nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.sqrt()))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in 2.13
def test_torchscript_module_after_the_profiling_runs():
    """TorchScript's profiling executor swaps graphs after two runs: each call matches the deleted program."""
    lin, x0, expected = _setup()

    scripted = torch.jit.script(_TanhSqrt(lin))
    for _ in range(4):
        x = x0.clone().requires_grad_()
        got = gw.grad(scripted(x)[[0, 2]].sum(), x)[0]
        assert torch.equal(got[1], torch.zeros(2, dtype=torch.float64))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)  # (a scripted graph may fuse differently)


def test_exported_module_under_strong_zeros_and_trace():
    lin, x0, expected = _setup()

    module = torch.export.export(_TanhSqrt(lin), (x0.abs(),)).module()
    x = x0.clone().requires_grad_()
    with gw.strong_zeros():
        module(x)[[0, 2]].sum().backward()
    assert torch.equal(x.grad, expected)
    x = x0.clone().requires_grad_()
    with gw.trace() as report:
        module(x)[[0, 2]].sum().backward()
    assert [f.kind for f in report.findings] == ["contamination"]


def test_jacfwd_and_forward_ad_are_untouched_by_strong_zeros():
    """Forward mode runs no backward: strong zeros change nothing (where's JVP already drops the unused branch)."""
    expected = torch.func.jacfwd(_contaminated)(_X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            got = torch.func.jacfwd(_contaminated)(_X)
    assert torch.equal(got, expected) and bool(got.isfinite().all())


# ---------------------------------------------------------------------------------------------------------
# A backward recorded into a graph by make_fx (what aot_function and non-strict torch.export build on)
# ---------------------------------------------------------------------------------------------------------

def _grad_of_contaminated(x: torch.Tensor) -> torch.Tensor:
    return gw.grad(_contaminated(x), x)[0]


def _plain_grad_of_contaminated(x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(_contaminated(x), x)[0]


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_gw_grad_recorded_by_make_fx_says_its_graph_is_plain(mode):
    """make_fx records gw.grad's backward as PyTorch's plain ops: running the graph keeps the contamination, so
    gradwise must say so. With real tracing and a NaN in the tracing data the plan chose the strong pass, whose
    reads the proxy mode refused ("get value out of a tracing tensor"): a crash inside gradwise."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with pytest.warns(gw.PlainBackwardWarning, match="recorded into a graph"):
        gm = make_fx(_grad_of_contaminated, tracing_mode=mode)(_X.clone().requires_grad_())
    reference = make_fx(_plain_grad_of_contaminated, tracing_mode=mode)(_X.clone().requires_grad_())
    assert gm.code == reference.code  # PyTorch's plain backward, as the warning says
    got = gm(_X.clone().requires_grad_())
    assert torch.equal(got.nan_to_num(7.0), reference(_X.clone().requires_grad_()).nan_to_num(7.0))


def test_fake_mode_alone_records_nothing_and_stays_silent():
    """Control: a FakeTensorMode without make_fx (shape propagation) has no values and builds no graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FakeTensorMode() as fake, gw.strong_zeros():
            x = fake.from_tensor(_X).requires_grad_()
            (g,) = torch.autograd.grad(_contaminated(x), x)
    assert g.shape == _X.shape


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_trace_keeps_its_reads_out_of_a_make_fx_graph(mode):
    """gw.trace() sits above make_fx's proxy mode: its own checks (sums, amin, eq) were recorded into the user's
    graph, and in real mode its refused reads made a 'genuine NaN ... birth not observed' finding."""
    from torch.fx.experimental.proxy_tensor import make_fx

    reference = make_fx(_plain_grad_of_contaminated, tracing_mode=mode)(_X.clone().requires_grad_())
    with gw.trace() as report:
        gm = make_fx(_plain_grad_of_contaminated, tracing_mode=mode)(_X.clone().requires_grad_())
    assert gm.code == reference.code
    assert not report.findings and report.untraced_backwards >= 1
    assert any(n.startswith("recorded into a graph") for n in report.notes), report.notes


@pytest.mark.parametrize("block", ["trace", "watch"])
@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_a_make_fx_backward_is_one_untraced_call(mode, block):
    """make_fx's torch-function mode calls torch.autograd.grad's handler with the name the module resolves, the
    wrapper: the trace counted one recorded autograd.grad twice in Report.untraced_backwards, and gw.watch() read
    the real-mode tensors of the recording ("get value out of a tracing tensor": a crash inside the watch)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    reference = make_fx(_plain_grad_of_contaminated, tracing_mode=mode)(_X.clone().requires_grad_())
    with getattr(gw, block)() as report:
        gm = make_fx(_plain_grad_of_contaminated, tracing_mode=mode)(_X.clone().requires_grad_())
    assert gm.code == reference.code
    assert report.untraced_backwards == 1 and "may hold NaN/Inf" in report.summary()


# ---------------------------------------------------------------------------------------------------------
# A backward run under torch.inference_mode(): autograd's keys are skipped, so composite ops reach the mode whole
# ---------------------------------------------------------------------------------------------------------

def _contamination_cases():
    import case_files
    from test_reported_cases import HERE, _load

    out = []
    for path in [*sorted(HERE.glob("contamination_*.py")), case_files.PROJECT / "contamination.py"]:
        module = _load(path)
        out += [pytest.param(case, id=f"{path.stem}-{case.name}") for case in module.CASES]
    return out


@pytest.mark.filterwarnings(r"ignore:index_reduce\(\) is in beta:UserWarning")
@pytest.mark.filterwarnings("ignore::gradwise.GradwiseWarning")
@pytest.mark.parametrize("case", _contamination_cases())
def test_gw_grad_inside_inference_mode_matches_no_grad(case):
    """Under torch.inference_mode() a backward's composite ops (where.ScalarOther(c, g, 0), reshape, ...) reach the
    strong-zero mode undecomposed: their zeros were lost and the NaN stayed, silently (46 of the 173 cases; one more
    crashed). The reference is each case's deleted program, and gw.grad under no_grad, bit for bit."""
    torch.manual_seed(0)
    output, inputs, expected = case.build()
    try:
        with torch.inference_mode():
            torch.autograd.grad(output, inputs, retain_graph=True)
    except RuntimeError:
        pytest.skip("plain PyTorch cannot run this backward in inference mode")
    with torch.inference_mode():
        got = gw.grad(output, inputs)
    torch.manual_seed(0)
    output, inputs, _ = case.build()
    with torch.no_grad():
        reference = gw.grad(output, inputs)
    for g, r, e in zip(got, reference, expected, strict=True):
        torch.testing.assert_close(g, e.to(g.dtype), equal_nan=True, rtol=1e-5, atol=1e-6)
        assert torch.equal(g.nan_to_num(7.0), r.nan_to_num(7.0))


# ---------------------------------------------------------------------------------------------------------
# torch.library custom ops: reports name them in their own namespace
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("gwhunt::root", mutates_args=())
def _root(x: torch.Tensor) -> torch.Tensor:
    return x.sqrt()


@torch.library.custom_op("gwhunt::root_backward", mutates_args=())
def _root_backward(g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return g / (2 * out)


@_root.register_fake
def _(x):
    return torch.empty_like(x)


def _root_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


_root.register_autograd(lambda ctx, g: _root_backward(g, ctx.saved_tensors[0]), setup_context=_root_setup)


def test_a_custom_op_is_named_in_its_namespace():
    """The trace named gwhunt::root 'aten.root' (and its backward 'aten.root_backward'): no such aten op exists, so
    the report sent the user looking for a PyTorch op. Strong zeros cannot follow the rule-less backward: the NaN
    PyTorch computes stays, with an OpaqueBackwardWarning naming the op."""
    x = _X.clone().requires_grad_()
    expected = torch.autograd.grad(torch.where(x > 0, _root(x), 0.0).sum(), x)[0]
    with pytest.warns(gw.OpaqueBackwardWarning, match="gwhunt.root_backward"):
        got = gw.grad(torch.where(x > 0, _root(x), 0.0).sum(), x)[0]
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    with gw.trace() as report:
        torch.where(x > 0, _root(x), 0.0).sum().backward()
    (f,) = report.findings
    assert f.op == "gwhunt.root" and f.born_op == "gwhunt.root", str(report)
    assert "gwhunt.root_backward" in f.message and "aten.root" not in str(report)


def test_trace_of_a_backward_in_inference_mode_classifies_contamination():
    """The trace's shadow strong-zero pass lost the same zeros under torch.inference_mode(): where's discarded
    sqrt(-1) and a float32 LSTM's NaN padding were reported as genuine NaN (the deleted programs are finite)."""
    x = _X.clone().requires_grad_()
    with gw.trace() as report:
        out = torch.where(x > 0, x.sqrt(), 0.0).sum()
        with torch.inference_mode():
            torch.autograd.grad(out, x)
    assert [f.kind for f in report.findings] == ["contamination"], str(report)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 2)
    data = torch.randn(4, 2, 3)
    data[2:, 1] = nan  # the second sequence's padding steps
    with gw.trace() as report:
        loss = lstm(data)[0][:2, 1].sum()
        with torch.inference_mode():
            torch.autograd.grad(loss, list(lstm.parameters()))
    assert report.of_kind("contamination") and not report.of_kind("nan"), str(report)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace is deprecated in 2.13
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_a_backward_is_pytorchs_under_strong_zeros():
    """torch.jit.trace of a function that takes a gradient: PyTorch refuses it ("Cannot insert a Tensor that requires
    grad as a constant"). Under strong zeros with a NaN in the tracing data the strong pass ran at trace time and the
    trace 'succeeded', recording PyTorch's plain backward: the traced function returned the contaminated NaN
    silently. Now the backward runs as PyTorch's, with a warning that the graph holds plain ops."""
    def fn(x):
        return torch.autograd.grad(_contaminated(x), x)[0]

    with pytest.raises(RuntimeError, match="requires grad as a constant"):
        torch.jit.trace(fn, (_X.clone().requires_grad_(),), check_trace=False)
    with pytest.raises(RuntimeError, match="requires grad as a constant"), \
            pytest.warns(gw.PlainBackwardWarning, match="torch.jit.trace"), gw.strong_zeros():
        torch.jit.trace(fn, (_X.clone().requires_grad_(),), check_trace=False)


@pytest.mark.parametrize("name", ["func.grad genuine", "vmap(grad)", "is_grads_batched"])
def test_watch_never_calls_an_untraced_gradient_clean(name):
    """gw.watch() skips the backward calls it cannot read (a torch.func transform, batched seeds), and its report
    said 'No NaN/Inf gradients' although the gradient holds NaN."""
    call = _UNTRACED[name]
    with gw.watch() as report:
        got = call()
    assert bool(got.isnan().any())
    assert "may hold NaN/Inf" in report.summary() and report.untraced_backwards == 1


def test_watch_of_finite_steps_stays_silent():
    """Control: plain finite steps leave the watch's report empty, with nothing untraced."""
    lin = torch.nn.Linear(2, 1)
    with gw.watch() as report:
        for _ in range(2):
            lin(torch.ones(3, 2)).sum().backward()
    assert not report.findings and not report.notes and report.untraced_backwards == 0


def _scripted_grad(x: torch.Tensor) -> torch.Tensor:
    y = torch.where(x > 0, x.sqrt(), torch.zeros_like(x)).sum()
    (g,) = torch.autograd.grad([y], [x])
    assert g is not None
    return g


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in 2.13
def test_trace_counts_a_backward_torchscript_starts():
    """A scripted function's torch.autograd.grad is TorchScript's builtin: the C++ engine runs without the trace's
    wrappers, whose report said 'No NaN/Inf gradients' although the gradient it returned holds NaN."""
    scripted = torch.jit.script(_scripted_grad)
    expected = scripted(_X.clone().requires_grad_())
    assert bool(expected.isnan().any())
    with gw.trace() as report:
        got = scripted(_X.clone().requires_grad_())
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
    assert "may hold NaN/Inf" in report.summary() and report.untraced_backwards == 1, str(report)
    with gw.trace() as report:  # control: the same gradient through the Python API is traced, and found
        x = _X.clone().requires_grad_()
        _scripted_grad(x)
    assert [f.kind for f in report.findings] == ["contamination"] and report.untraced_backwards == 0


class _ScriptedGradient(torch.nn.Module):
    """A module whose forward takes a gradient (a submodule's, so that the call is inlined into the top graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _ScriptedGradientInner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1.0


class _ScriptedGradientInner(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scripted_grad(x)


class _ScriptedGradInBackward(torch.autograd.Function):
    """Identity whose backward takes the gradient of `_contaminated` with TorchScript (a scripted helper)."""

    scripted = None

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            return g * _ScriptedGradInBackward.scripted(x.detach().requires_grad_())


def _script_cases() -> dict:
    # (built lazily: scripting at import would warn DeprecationWarning outside the tests' filter)
    scripted = torch.jit.script(_scripted_grad)
    _ScriptedGradInBackward.scripted = scripted
    module = torch.jit.script(_ScriptedGradient())

    def in_backward(grad):
        x = _X.clone().requires_grad_()
        return grad(_ScriptedGradInBackward.apply(x).sum(), x)[0]

    # name -> (PyTorch's call, the call under gradwise)
    return {
        "function": (lambda: scripted(_X.clone().requires_grad_()),) * 2,
        "module (callee inlined)": (lambda: module(_X.clone().requires_grad_()),) * 2,
        "gw.grad whose backward calls it": (lambda: in_backward(torch.autograd.grad), lambda: in_backward(gw.grad)),
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in 2.13
@pytest.mark.parametrize("name", ["function", "module (callee inlined)", "gw.grad whose backward calls it"])
def test_torchscript_gradient_under_strong_zeros_is_said(name):
    """TorchScript's builtin torch.autograd.grad runs the C++ engine directly: under gw.strong_zeros() (and inside
    gw.grad's backward) it ran plain and kept the contaminated NaN without a word. It still runs plain (nothing can
    take its place), now with a PlainBackwardWarning naming the scripted code; the gradient is PyTorch's."""
    plain, call = _script_cases()[name]
    expected = plain()
    assert bool(expected.isnan().any())  # the premise: PyTorch's gradient holds the contaminated NaN
    with pytest.warns(gw.PlainBackwardWarning, match=r"TorchScript code \S*(_scripted_grad|_ScriptedGradient)"), \
            gw.strong_zeros() if call is plain else contextlib.nullcontext():
        got = call()
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in 2.13
def test_torchscript_without_a_gradient_is_silent_and_plain_outside_blocks():
    """Control: scripted code that takes no gradient gets no warning (its backward, run from Python, has strong
    zeros); outside every block a scripted call is PyTorch's (the wrapper stays from the first block on, and
    passes straight through)."""
    lin, x0, _ = _setup()
    scripted = torch.jit.script(_TanhSqrt(lin))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.GradwiseWarning)
        with gw.strong_zeros():
            assert torch._C.ScriptMethod.__call__ is not _script._ORIGINAL[torch._C.ScriptMethod]
            x = x0.clone().requires_grad_()
            scripted(x)[[0, 2]].sum().backward()
        assert torch.equal(x.grad[1], torch.zeros(2, dtype=torch.float64))
        y = x0.clone().requires_grad_()
        scripted(y)[[0, 2]].sum().backward()  # outside: PyTorch's gradient, no warning
    assert y.grad[1].isnan().any()
