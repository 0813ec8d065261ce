"""Hunt: gradwise's value reads where PyTorch traces (torch.compile, make_fx, FakeTensorMode, torch.func), and its
process-wide state under threads.

References are independent of gradwise's rules: the same call made eagerly outside the trace (numbers that are
bitwise the eager ones), PyTorch's own gradient of the program with the declaration removed, and single-threaded
runs of the same steps (bitwise).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import gradwise as gw
from _compiling import fresh_dynamo  # noqa: F401 (an autouse fixture: every test here)

nan = float("nan")


def _kinked(v: torch.Tensor) -> torch.Tensor:
    return torch.relu(v).sum() + v.abs().max()


_X = (0.0, 1.0, -1.0)  # relu's kink at 0, abs's max tied between 1 and -1
_NONSMOOTH = {
    "directional_derivative": lambda x: gw.directional_derivative(_kinked, x, torch.ones_like(x)),
    "generalized_grad": lambda x: gw.generalized_grad(_kinked, x, seed=0)[0],
    "subdifferential": lambda x: gw.subdifferential(_kinked, x, seed=0).min_norm_element()[0],
    "stationarity": lambda x: torch.tensor(gw.stationarity(_kinked, x).min_norm),
}


@pytest.mark.parametrize("name", sorted(_NONSMOOTH))
def test_nonsmooth_call_inside_torch_compile_runs_eagerly(name):
    """A nonsmooth function called inside a torch.compile'd function: dynamo traced into gradwise's passes and
    failed on ``torch.compiler.set_stance`` (an AssertionError from dynamo). The call now graph-breaks and runs
    eagerly: its value is the eager call's, bitwise."""
    call = _NONSMOOTH[name]
    expected = call(torch.tensor(_X))
    got = torch.compile(lambda x: call(x * 1.0), backend="aot_eager")(torch.tensor(_X))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(_NONSMOOTH))
@pytest.mark.parametrize("where", ["fake tensors", "fake mode", "make_fx"])
def test_nonsmooth_call_where_pytorch_traces_says_so(name, where):
    """Kinks depend on values, which tensors PyTorch traces do not have (a fake tensor; make_fx's real mode would
    bake the branches taken into its graph). Meta inputs were refused with a message, fake ones crashed inside
    gradwise (DataDependentOutputException from aten._local_scalar_dense)."""
    call = _NONSMOOTH[name]
    with pytest.raises((TypeError, gw.NonsmoothError), match="trac"):
        if where == "fake tensors":
            with FakeTensorMode() as mode:
                x = mode.from_tensor(torch.tensor(_X))
            call(x)
        elif where == "fake mode":
            with FakeTensorMode():
                call(torch.tensor(_X))
        else:
            make_fx(call)(torch.tensor(_X))


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_mark_unused_recorded_by_make_fx_reads_no_value(tracing_mode):
    """gw.mark_unused's declaration check under make_fx's real mode (plain tensors, a proxy mode recording): the
    check ran with the modes off, so the graph held the mask it computed from the traced seed as a constant. Run on
    a seed that reaches an unused element (the code does read it), the graph zeroed that gradient silently
    ([1, 1, 5] -> [1, 1, 0]); under a trace the element keeps its gradient, as PyTorch's program without the
    declaration gives (documented: never a silently zeroed one)."""
    def f(x, seed):
        unused = torch.tensor([False, False, True])
        return torch.autograd.grad(gw.mark_unused(x * 1.0, unused), x, seed)[0]

    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    graph = make_fx(f, tracing_mode=tracing_mode)(x, torch.tensor([1.0, 1.0, 0.0]))
    for seed in ([1.0, 1.0, 5.0], [1.0, 1.0, 0.0], [2.0, 0.0, -3.0]):
        seed = torch.tensor(seed)
        assert torch.equal(graph(x, seed), torch.autograd.grad(x * 1.0, x, seed)[0])


# ------------------------------------------------------------------------------------------------ threads


def _thread_step(mode: str, seed: int) -> torch.Tensor:
    """One step of a small model whose padding rows hold NaN, under ``mode``: its parameters' gradients (or the
    generalized gradient of a kinked loss), flattened."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=gen))
        lin.bias.copy_(torch.randn(3, generator=gen))
    x = torch.randn(6, 4, generator=gen)
    x[4:] = nan

    def loss() -> torch.Tensor:
        h = lin(x)
        return torch.where(h > 0, h, 0.0)[:4].sqrt().sum() + torch.relu(h[:4]).max()

    if mode == "generalized":
        w, b = lin.weight.detach(), lin.bias.detach()
        g = gw.generalized_grad(lambda w, b: torch.relu(x[:4] @ w.T + b).sum() + (x[:4] @ w.T).abs().max(), (w, b),
                                seed=0)
        return torch.cat([t.flatten() for t in g])
    if mode == "strong":
        with gw.strong_zeros():
            loss().backward()
    elif mode == "gw.grad":
        for p, g in zip(lin.parameters(), gw.grad(loss(), list(lin.parameters())), strict=True):
            p.grad = g
    elif mode in ("trace", "watch"):
        with gw.trace() if mode == "trace" else gw.watch() as report:
            loss().backward()
        assert report.findings
    else:
        loss().backward()
    return torch.cat([p.grad.flatten() for p in lin.parameters()])


_MODES = ("strong", "trace", "plain", "watch", "gw.grad", "generalized")


def test_threads_in_different_modes_get_their_single_threaded_gradients():
    """Six threads at once, each in its own mode (strong zeros, a trace, a watch, plain, gw.grad, a nonsmooth
    call): each thread's gradients are bitwise those of the same steps run alone in one thread (NaN where they
    are: the plain, traced and watched threads keep PyTorch's contamination, the strong ones have none)."""
    expected = {(m, s): _thread_step(m, s) for m in _MODES for s in range(2)}
    assert expected[("plain", 0)].isnan().any() and not expected[("strong", 0)].isnan().any()
    got: dict[tuple[str, int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(_MODES))

    def worker(mode: str) -> None:
        try:
            barrier.wait()
            for i in range(6):
                got[(mode, i % 2, i)] = _thread_step(mode, i % 2)
        except BaseException as e:  # (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(m,)) for m in _MODES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (mode, seed, _), g in got.items():
        e = expected[(mode, seed)]
        assert torch.equal(g.isnan(), e.isnan()) and torch.equal(g.nan_to_num(), e.nan_to_num()), mode


# ------------------------------------------------------------------------------------------------ bounded caches


def test_trace_file_caches_stay_bounded_over_new_graph_modules(monkeypatch):
    """The trace's caches of which code files are torch's/gradwise's were keyed by file name and never emptied;
    every torch.fx GraphModule has a file name of its own ("<eval_with_key>.N"), so a traced program that builds
    one per step grew them by one entry a step without end. They are emptied when full (here made small)."""
    from gradwise._trace import _common

    monkeypatch.setattr(_common, "_FILES_KEPT", 8, raising=False)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.ReLU())
    x = torch.randn(4, 3)
    with gw.trace() as report:
        for _ in range(24):
            torch.fx.symbolic_trace(model)(x).sum().backward()
    assert len(_common._internal_file) <= 8 and len(_common._core_file) <= 8
    assert report.forward_ops > 0 and not report.findings


def test_a_nonsmooth_pass_leaves_other_threads_compiled_code_compiled():
    """A pass of f ran every thread under ``torch.compiler.set_stance("force_eager")`` (dynamo's stance is one for
    the process): while one thread differentiated with a nonsmooth function, other threads' compiled code ran
    eagerly (another kernel's rounding, eager speed). Now only the thread inside the pass runs compiled code
    eagerly; here the other thread's call runs the compiled graph, and f's own call does not."""
    calls: list[int] = []

    def backend(gm, example_inputs):
        def run(*args):
            calls.append(threading.get_ident())
            return gm(*args)
        return run

    compiled = torch.compile(lambda v: v.sin().sum(), backend=backend)
    compiled(torch.randn(3))
    calls.clear()
    in_pass, done = threading.Event(), threading.Event()

    def f(v):
        in_pass.set()
        done.wait(30)
        return torch.relu(v).sum() + compiled(v)

    def other() -> None:
        in_pass.wait(30)
        try:
            compiled(torch.randn(3))
        finally:
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    value = gw.directional_derivative(f, torch.tensor([0.0, 1.0]), torch.ones(2))
    thread.join()
    assert calls == [thread.ident]
    torch.testing.assert_close(value, 3.0 + torch.cos(torch.tensor(1.0)))  # relu's one-sided 1 + 1, sin's cos


def _contaminated_trace() -> list[tuple[str, str, int]]:
    lin = torch.nn.Linear(3, 1)
    x = torch.tensor([[1.0, 2.0, 3.0], [nan, 1.0, 1.0]])
    with gw.trace() as report:
        lin(x)[:1].sum().backward()
    return sorted((f.kind, f.op, f.count) for f in report.findings)


def test_a_trace_sees_its_thread_while_another_thread_differentiates():
    """gw.trace() passed over every op while a forward-AD dual level was open, and the level is one for the
    process: while another thread ran a nonsmooth call (whose passes open one), a trace saw nothing (no finding
    for a contamination it reports alone; 'forward-AD dual tensors: N op(s) passed over'). Another thread's
    passes make none of its tensors duals: it reads them as alone."""
    alone = _contaminated_trace()
    assert ("contamination", "aten.mm", 1) in alone
    in_pass, done = threading.Event(), threading.Event()
    got: list = []

    def f(v):
        in_pass.set()
        done.wait(30)
        return torch.relu(v).sum()

    def other() -> None:
        in_pass.wait(30)
        try:
            got.append(_contaminated_trace())
        finally:
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    gw.directional_derivative(f, torch.tensor([0.0, 1.0]), torch.ones(2))
    thread.join()
    assert got == [alone]


@pytest.mark.parametrize("mode", ["strong", "trace", "watch"])
def test_a_function_class_defined_per_step_is_freed(mode):
    """A custom autograd.Function defined inside the forward (a class per call): the per-node-type tables of the
    strong-zero plan and the watch's replay (keyed by node type) kept every class alive, one a step with what its
    methods closed over, where plain PyTorch frees each. Now a Function's node type keeps its own facts; what
    stays alive is bounded by the plans kept per graph shape (``_SHAPED_MAX``)."""
    import gc
    import weakref

    from gradwise._strong_zeros import _planning

    alive: list[weakref.ref] = []
    block = {"strong": gw.strong_zeros, "trace": gw.trace, "watch": gw.watch}[mode]
    for _ in range(_planning._SHAPED_MAX + 16):
        class Rounded(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x.round()

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                return g * (x.abs() < 10)

        alive.append(weakref.ref(Rounded))
        x = torch.tensor([1.0, 2.0, nan], requires_grad=True)
        with block():
            Rounded.apply(x * 2)[:2].sum().backward()
        assert torch.equal(x.grad[:2], torch.tensor([2.0, 2.0]))
    gc.collect()
    assert sum(r() is not None for r in alive) <= _planning._SHAPED_MAX


def test_a_stance_context_of_another_thread_that_outlives_a_pass_leaves_dynamo_working():
    """Another thread enters ``torch.compiler.set_stance(...)`` while a pass is open and exits it after the pass
    closed: its exit put back the pass's stance switch, and the next pass wrapped that switch again, whose
    force_eager part was then made of a str: every later nonsmooth call running compiled code crashed inside
    dynamo (AttributeError: 'str' object has no attribute 'skip_guard_eval_unsafe'). On 9754bc8 the process
    stayed in force_eager instead (every compiled function eager). Now the switch left over acts as the stance
    it replaced, the next pass unwraps it, and compiled code compiles again."""
    import torch._dynamo.eval_frame as eval_frame

    compiled = torch.compile(lambda v: torch.relu(v) * 2.0, backend="eager")
    x, d = torch.tensor([0.0, 1.0, -1.0]), torch.ones(3)
    expected = gw.directional_derivative(lambda v: compiled(v).sum(), x, d)
    in_pass, entered, closed = threading.Event(), threading.Event(), threading.Event()

    def f(v):
        in_pass.set()
        entered.wait(30)
        return compiled(v).sum()

    def other() -> None:
        in_pass.wait(30)
        stance = torch.compiler.set_stance("eager_on_recompile")
        entered.set()
        closed.wait(30)
        stance.__exit__(None, None, None)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert torch.equal(gw.directional_derivative(f, x, d), expected)
    finally:
        closed.set()
        thread.join()
    assert eval_frame._stance.stance == "default"
    assert torch.equal(gw.directional_derivative(lambda v: compiled(v).sum(), x, d), expected)
    assert eval_frame._stance.stance == "default"
    calls: list[int] = []

    def backend(gm, example_inputs):
        calls.append(1)
        return gm

    torch.compile(lambda v: v.sin(), backend=backend)(x)
    assert calls == [1]  # compiled, not eager (9754bc8: force_eager for the rest of the process)


def test_a_stance_f_sets_stays_as_after_a_plain_run_of_f():
    """f's own ``torch.compiler.set_stance("eager_on_recompile")`` (the function form: a lasting setting) was put
    back by the end of the pass on 9754bc8 (the stance from before the call); a plain run of f leaves it set. A
    stance context f enters and exits leaves the stance from before the call."""
    import torch._dynamo.eval_frame as eval_frame

    compiled = torch.compile(lambda v: torch.relu(v) * 2.0, backend="eager")
    x, d = torch.tensor([0.0, 1.0, -1.0]), torch.ones(3)

    def in_context(v):
        with torch.compiler.set_stance("force_eager"):
            return compiled(v).sum()

    def lasting(v):
        torch.compiler.set_stance("eager_on_recompile")
        return compiled(v).sum()

    try:
        assert torch.equal(gw.directional_derivative(in_context, x, d), torch.tensor(4.0))
        assert eval_frame._stance.stance == "default"
        assert torch.equal(gw.directional_derivative(lasting, x, d), torch.tensor(4.0))
        assert eval_frame._stance.stance == "eager_on_recompile"
    finally:
        torch.compiler.set_stance("default")


def test_a_trace_under_its_own_dual_level_passes_over_while_another_thread_tries_a_nonsmooth_call():
    """A trace in a thread holding its own forward-AD dual level passes over its ops (reductions of duals would
    build tangents; 9754bc8 and alone). On audit28 any open nonsmooth pass marked the level as another thread's:
    while a second thread's call was inside its pass context (its own dual level then fails: "Nested forward mode
    AD"), the trace traced this thread's duals (reports with ops traced, 48 steps in 300). The mark is now set only
    while a pass's own dual level is open."""
    import torch.autograd.forward_ad as fwAD

    x, w = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]), torch.linspace(-1.0, 1.0, 12).reshape(3, 4)
    stop = threading.Event()
    refused: list[str] = []

    def other() -> None:
        while not stop.is_set():
            try:
                gw.directional_derivative(_kinked, torch.tensor(_X), torch.ones(3))
            except RuntimeError as e:
                refused.append(str(e))

    traced: list[int] = []
    with fwAD.dual_level():
        thread = threading.Thread(target=other)
        thread.start()
        try:
            for _ in range(300):
                with gw.trace() as report:
                    dual = fwAD.make_dual(x, torch.ones_like(x))
                    (dual @ w).softmax(-1).log().sum()
                traced.append(report.forward_ops)
        finally:
            stop.set()
            thread.join()
    assert refused and all("Nested forward mode AD" in m for m in refused)
    assert traced == [0] * 300


@pytest.mark.parametrize("mode", ["trace", "strong"])
def test_a_tensor_subclass_defined_per_step_is_freed(mode):
    """A tensor subclass made per step (a closure's tag type, ``x.as_subclass(C)``): the trace's type tables
    (whether an op's argument types are plain, whether a subclass overrides dispatch) held every class for the rest
    of the run, one a step; plain PyTorch frees each with its last tensor. Now one table is weak and the other
    is emptied when it outgrows a bound."""
    import gc
    import weakref

    alive: list[weakref.ref] = []
    block = {"strong": gw.strong_zeros, "trace": gw.trace}[mode]
    for _ in range(300):
        class Tagged(torch.Tensor):
            pass

        alive.append(weakref.ref(Tagged))
        x = torch.tensor([1.0, 2.0, nan], requires_grad=True)
        with block():
            (x * 2).as_subclass(Tagged)[:2].sum().backward()
        assert torch.equal(x.grad, torch.tensor([2.0, 2.0, 0.0]))
        del Tagged
    gc.collect()
    assert sum(r() is not None for r in alive) < 260
