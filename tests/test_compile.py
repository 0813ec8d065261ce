"""Strong zeros under torch.compile (gradwise._strong_zeros._compile, _compile_pass, _traced).

References are independent of the rules: the same program with the unused rows deleted (run eagerly, plain
PyTorch), and on finite data the same compiled function's plain PyTorch gradient (bitwise). Compilation is slow
on small CI machines, so the default run compiles a handful of graphs once (module-scoped) and reuses them; the
full sweep of the contamination cases is marked slow.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _compiling  # noqa: F401 (inductor imported quietly)
import gradwise as gw
from gradwise._strong_zeros import _compile, _contract
from gradwise._strong_zeros._planning import _plan

nan = float("nan")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin(x)))


def _loss(net: _Net, x: torch.Tensor, keep: int) -> torch.Tensor:
    """Rows from ``keep`` on are padding: the loss never reads them. sqrt of the negatives is never used."""
    h = net(x)[:keep]
    return h.sum() + torch.where(x[:keep] > 0, x[:keep].sqrt(), 0.0).sum()


def _data(n: int = 8, keep: int = 5, pad: float = nan, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    x[keep:] = pad
    return x


def _grads(net: _Net, x: torch.Tensor, fn, strong: bool) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    if strong:
        with gw.strong_zeros():
            fn(x).backward()
    else:
        fn(x).backward()
    return [x.grad, *(p.grad for p in net.parameters())]


def _deleted(net: _Net, x: torch.Tensor, keep: int) -> list[torch.Tensor]:
    """The reference: plain eager PyTorch on the program with the padding rows deleted (zero gradient there)."""
    xs = x[:keep].clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    (net(xs).sum() + xs[xs.detach() > 0].sqrt().sum()).backward()  # the unused branch of where deleted too
    gx = torch.zeros_like(x)
    gx[:keep] = xs.grad
    return [gx, *(p.grad for p in net.parameters())]


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)


def _equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w) or ((g.isnan() == w.isnan()).all() and torch.equal(g.nan_to_num(), w.nan_to_num()))


@pytest.fixture(scope="module", autouse=True)
def _fresh_compiles():
    """AOTAutograd's on-disk cache would hand back backwards compiled by an earlier run (without their graph
    metadata): those take another path, tested on its own (test_aot_autograd_cache_hit)."""
    # fallback_random: inductor draws the eager RNG's numbers, so a case's compiled data is its eager data
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fallback_random=True):
        yield


@pytest.fixture(scope="module")
def net() -> _Net:
    return _Net()


@pytest.fixture(scope="module")
def inside(net):
    """fullgraph inductor, compiled by its first call inside gw.strong_zeros()."""
    return torch.compile(lambda x: _loss(net, x, 5), fullgraph=True)


@pytest.fixture(scope="module")
def outside(net):
    """dynamic-shape inductor, compiled by a first call outside the block."""
    fn = torch.compile(lambda x: _loss(net, x, 5), dynamic=True)
    _grads(net, _data(), fn, strong=False)
    return fn


def test_traced_tensors_step_aside(monkeypatch):
    """_plan never reads fake/functional/functorch/meta tensors (no data_ptr/.item() crash while PyTorch traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, requires_grad=True)
        y = torch.where(x > 0, x.sqrt(), 0.0).sum()
        assert _plan([y], [None]) == "plain"
    meta = torch.empty(3, device="meta", requires_grad=True)
    assert _plan([(meta * 2).sum()], [None]) == "plain"
    monkeypatch.setattr(_contract, "_warned", set())  # the warning is once per process
    # torch.func runs with wrapped tensors: no crash and no read of them inside the block; the strong pass runs
    # without a plan (_strong_zeros/_transforms.py), its gradient the eager gw.grad's
    def f(t):
        return torch.where(t > 0, t.sqrt(), 0.0).sum()

    x = torch.tensor([-1.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            g = torch.func.grad(f)(x)
    assert torch.equal(g, gw.grad(f(xx := x.clone().requires_grad_()), xx)[0])


def test_gradient_compiled_into_a_graph_is_never_silent(monkeypatch):
    """torch.compile(torch.func.grad(f)): the gradient is computed by the compiled graph, no backward gradwise could
    give strong zeros runs. Compiled by a call outside the block, it was silent inside it (issue #12): now entering
    the block warns, naming the call; compiled inside the block (vjp), it warns at once. The gradients stay
    PyTorch's. An ordinary compiled forward with a backward of its own (AOTAutograd's joint trace) warns nothing."""
    from gradwise._strong_zeros import _engine

    monkeypatch.setattr(_engine, "_known_sites", set(), raising=False)
    monkeypatch.setattr(_engine, "_pending_sites", [], raising=False)
    monkeypatch.setattr(_contract, "_warned", set())

    def f(t):
        return t.tanh()[:2].sum()

    x = torch.tensor([1.0, 2.0, float("nan")])
    expected = torch.func.grad(f)(x)
    grad_f = torch.compile(torch.func.grad(f), backend="aot_eager")
    assert torch.equal(grad_f(x).isnan(), expected.isnan())  # the trace, outside any block
    here = f"{__file__}:{sys._getframe().f_lineno - 1}"
    with pytest.warns(gw.PlainBackwardWarning, match=f"call at {re.escape(here)} computes a gradient inside"):
        with gw.strong_zeros():
            got = grad_f(x)
    torch.testing.assert_close(got, expected, equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():  # once per call site
            grad_f(x)
    vjp_f = torch.compile(lambda t: torch.func.vjp(f, t)[1](torch.tensor(1.0))[0], backend="aot_eager")
    with gw.strong_zeros(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vjp_f(x)  # (and the PlainBackwardWarning of its traced backward's wrapped tensors)
    assert any("computes a gradient inside" in str(w.message) for w in caught)
    lin = torch.nn.Linear(3, 3)
    plain_step = torch.compile(lambda t: lin(t).tanh().sum(), backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain_step(x.nan_to_num()).backward()
        with gw.strong_zeros():
            plain_step(x.nan_to_num()).backward()


def test_gradient_compiled_on_another_thread_inside_an_open_block(monkeypatch):
    """A block entered before torch.compile traces a gradient into a graph on another thread: no entry is left to
    warn at, and the block's own call of the compiled function runs no backward. Its NaN was kept silently; the
    trace now warns at once while any thread is inside a block."""
    from gradwise._strong_zeros import _engine

    monkeypatch.setattr(_engine, "_known_sites", set())
    monkeypatch.setattr(_engine, "_pending_sites", [])
    grad_f = torch.compile(torch.func.grad(lambda t: t.tanh()[:2].sum()), backend="aot_eager")
    x = torch.tensor([1.0, 2.0, nan])
    with warnings.catch_warnings(record=True) as caught, gw.strong_zeros():
        warnings.simplefilter("always")  # (global: the compiling thread's warning is recorded too)
        compiling = threading.Thread(target=grad_f, args=(x,))
        compiling.start()
        compiling.join()
        got = grad_f(x)
    assert got.isnan().any()  # PyTorch's gradient, as the warning says
    assert any("computes a gradient inside" in str(w.message) for w in caught)


def test_warnings_under_a_watch_name_the_users_line(monkeypatch):
    """gw.watch() wraps torch.autograd.grad/backward from gradwise/_trace: the frames skipped to find the user's line
    were torch's and gradwise/_strong_zeros' only, so under a watch the traced gradient's call site and a plain
    backward's warning location were gradwise's own _watching.py, not the user's line."""
    from gradwise._strong_zeros import _engine

    monkeypatch.setattr(_engine, "_known_sites", set())
    monkeypatch.setattr(_engine, "_pending_sites", [])
    monkeypatch.setattr(_contract, "_warned", set())
    grad_f = torch.compile(torch.func.grad(lambda t: t.tanh()[:2].sum()), backend="aot_eager")
    x = torch.tensor([1.0, 2.0, nan], requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gw.watch():
            grad_f(x.detach())
            here = f"{__file__}:{sys._getframe().f_lineno - 1}"
            with gw.strong_zeros():
                torch.func.hessian(lambda t: t.sin().sum())(x.detach())  # not followed: plain, said
                batched_line = sys._getframe().f_lineno - 1
    traced = [w for w in caught if "computes a gradient inside" in str(w.message)]
    assert len(traced) == 1 and f"call at {here} computes" in str(traced[0].message)
    batched = [w for w in caught if "ran as plain PyTorch" in str(w.message)]
    assert [(w.filename, w.lineno) for w in batched] == [(__file__, batched_line)]


def test_compiled_inside_the_block(net, inside):
    """First call inside the block: no BackendCompilerFailed, fullgraph holds, the gradient is the one of the
    program with the padding deleted, and the pass alone did it (no op-by-op re-run)."""
    x = _data()
    before = dict(_compile.STATS)
    got = _grads(net, x, inside, strong=True)
    assert _compile.STATS["eager"] == before["eager"]
    assert _compile.STATS["compiled"] > before["compiled"]
    _close(got, _deleted(net, x, 5))
    plain = _grads(net, x, inside, strong=False)  # outside the block: PyTorch's NaN, untouched
    assert plain[1].isnan().any()


def test_compiled_finite_data_bitwise(net, inside):
    x = _data(pad=3.0).abs() + 0.5  # no NaN anywhere, not even in the unused sqrt branch
    _equal(_grads(net, x, inside, strong=True), _grads(net, x, inside, strong=False))


def test_genuine_nan_stays(net, inside):
    """A NaN in a row the loss reads is genuine: it stays (as in plain PyTorch), with a warning that gradwise
    cannot tell it from contamination inside a compiled graph."""
    x = _data()
    x[0, 0] = nan
    with pytest.warns(_compile.CompiledBackwardWarning, match="may be contamination, or genuine"):
        got = _grads(net, x, inside, strong=True)
    assert got[1].isnan().any()
    _close(got, _deleted(net, x, 5))  # NaN exactly where plain PyTorch has it on the program without padding


def test_compiled_outside_dynamic(net, outside):
    """Compiled (dynamic=True) by a call outside the block: inside it the backward gets strong zeros without
    recompiling the forward, for two batch sizes; gw.grad too."""
    for n in (8, 11):
        x = _data(n=n)
        _close(_grads(net, x, outside, strong=True), _deleted(net, x, 5))
    x = _data(n=9)
    y = outside(x.clone().requires_grad_(True))
    (g,) = gw.grad(y, [net.lin.weight])
    torch.testing.assert_close(g, _deleted(net, x, 5)[1], rtol=1e-5, atol=1e-6)
    plain = _grads(net, _data(n=8), outside, strong=False)
    assert plain[1].isnan().any()  # and outside, plain PyTorch again


def test_convolutions_cropped_border_take_the_pass():
    """A NaN border that the loss crops away, through three convolutions (padding 1) and relus: the pass's
    convolution_backward rule zeroes the input positions no kept output reads, so the compiled strong variant
    alone is right (no op-by-op re-run), and on finite data it is PyTorch's gradient bit for bit."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1))
    img = torch.randn(2, 2, 12, 12)
    framed, clean = F.pad(img, (2, 2, 2, 2), value=nan), F.pad(img, (2, 2, 2, 2), value=0.25)
    fn = torch.compile(lambda t: cnn(t)[..., 5:11, 5:11].square().mean())
    want = _grads(cnn, clean, fn, strong=False)
    before = dict(_compile.STATS)
    got = _grads(cnn, framed, fn, strong=True)
    assert _compile.STATS["eager"] == before["eager"] and _compile.STATS["compiled"] > before["compiled"]
    _close(got, want)
    assert _grads(cnn, framed, fn, strong=False)[1].isnan().any()  # plain PyTorch: the weights contaminated
    _equal(_grads(cnn, img, fn, strong=True), _grads(cnn, img, fn, strong=False))


def test_model_compiled_loss_eager(net):
    """Only the model is compiled; the padding is sliced away by eager code: the structural zero crosses the
    compiled graph's boundary, the pass cannot see it, and the backward re-runs op by op (aot_eager keeps the
    test fast; the slow sweep runs inductor)."""
    model = torch.compile(net, backend="aot_eager")
    x = _data()
    before = dict(_compile.STATS)
    got = _grads(net, x, lambda t: model(t)[:5].sum() + torch.where(t[:5] > 0, t[:5].sqrt(), 0.0).sum(), True)
    assert _compile.STATS["eager"] > before["eager"]
    _close(got, _deleted(net, x, 5))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
@pytest.mark.parametrize("hook", ["tensor", "post_accumulate", "module"])
def test_a_compiled_backward_with_hooks_runs_once(hook):
    """A compiled backward whose NaN its pass cannot annihilate (aot_eager runs no inductor pass) used to run
    twice, the second time under the eager rules: a hook on the parameters ran once on NaN gradients (an
    optimizer stepping in a post-accumulate hook would have stepped on NaN). It runs once, and the hook sees the
    gradient of the rows kept."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    weight = model[0].weight
    seen: list[torch.Tensor] = []
    if hook == "tensor":
        weight.register_hook(lambda g: seen.append(g.clone()))
    elif hook == "post_accumulate":
        weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    else:
        model[1].register_full_backward_hook(lambda m, gi, go: seen.append(gi[0].clone()))
    x = torch.randn(4, 4)
    x[2:] = nan
    f = torch.compile(lambda t: model(t)[:2].square().sum(), backend="aot_eager")
    with gw.strong_zeros():
        f(x).backward()
    assert len(seen) == 1 and seen[0].isfinite().all()
    (exp,) = torch.autograd.grad(model(x[:2]).square().sum(), [weight])
    torch.testing.assert_close(weight.grad, exp)


def test_a_finite_compiled_backward_with_hooks_is_plain_and_quiet():
    """Finite data, a hook on the parameters: the backward runs once through the compiled strong variant,
    PyTorch's gradients bit for bit, and no warning (the run-once path used to warn on every backward)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    calls: list[int] = []
    lin.weight.register_hook(lambda g: calls.append(1))
    f = torch.compile(lambda t: lin(t)[:2].square().sum(), backend="aot_eager")
    x = torch.randn(4, 4)
    (want,) = torch.autograd.grad(f(x), [lin.weight])
    with gw.strong_zeros():
        f(x).backward()  # pytest turns a warning into an error
    assert torch.equal(lin.weight.grad, want) and len(calls) == 2


def test_a_hooked_and_retained_intermediate_sees_one_backward():
    """Hooks and retain_grad on a compiled model's output are invisible from the autograd graph. The backward
    used to run twice when the compiled pass left a NaN (compiled, then op by op): the hook ran once on NaN and
    the retained gradient was the sum of both runs (2x, finite and wrong). Now the engine runs once, and only
    the compiled node whose variant made NaN runs again, op by op, inside that one run."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = torch.compile(lin, backend="aot_eager")  # no inductor pass: the NaN reaches the fallback
    x = torch.randn(8, 4)
    x[4:] = nan
    seen: list[torch.Tensor] = []
    h = model(x)
    h.retain_grad()
    h.register_hook(lambda g: seen.append(g.clone()))
    with gw.strong_zeros():
        h[:4].sum().backward()
    want = torch.zeros(8, 4)
    want[:4] = 1.0  # the slice's backward: the deleted rows' sensitivity is a structural zero
    assert len(seen) == 1 and torch.equal(seen[0], want) and torch.equal(h.grad, want)
    (exp,) = torch.autograd.grad(lin(x[:4]).sum(), [lin.weight])
    torch.testing.assert_close(lin.weight.grad, exp)


def _broken(low: nn.Module, up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(low(x))
    torch._dynamo.graph_break()
    return up(h[:4]).square().sum()  # rows 4.. of h (NaN) are dropped in the second graph


@pytest.mark.parametrize("recover", [True, False])
def test_a_zero_made_across_a_graph_break(recover, monkeypatch):
    """The zero is made in the upper graph (a slice), the NaN sits in the lower one: the upper graph's compiled
    result carries no support, so the lower graph, falling back op by op, gets the supports the upper graph's
    own op-by-op run finds. Without that recovery the NaN stays, with a CompiledBackwardWarning: never silent."""
    if not recover:
        monkeypatch.setattr(_compile._Hybrid, "recover", lambda self: setattr(self, "suspect", True))
    torch._dynamo.reset()
    torch.manual_seed(0)
    low, up = nn.Linear(4, 4), nn.Linear(4, 3)
    params = [*low.parameters(), *up.parameters()]
    x = torch.randn(8, 4)
    x[4:] = nan
    fn = torch.compile(lambda t: _broken(low, up, t), backend="aot_eager")
    want = torch.autograd.grad(_broken(low, up, x[:4]), params)
    with warnings.catch_warnings(record=True) as caught, gw.strong_zeros():
        warnings.simplefilter("always")
        fn(x).backward()
    kept = [w for w in caught if issubclass(w.category, _compile.CompiledBackwardWarning)]
    if recover:
        assert not kept
        _close([p.grad for p in params], list(want))
    else:
        assert kept and "graph break" in str(kept[0].message)
        assert not all(bool(p.grad.isfinite().all()) for p in params)


def _twice_broken(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = torch.tanh(x @ w1)  # the NaN rows meet tanh's backward here, in the first graph
    torch._dynamo.graph_break()
    b = a @ w2  # the zeros pass through a middle graph
    torch._dynamo.graph_break()
    return b[:4].square().sum()  # and are made in the last one


@pytest.mark.parametrize("how", ["grad", "backward"])
def test_a_zero_made_two_graph_breaks_away(how):
    """Three compiled graphs and leaves only: the nodes that fall back run op by op one at a time, and the
    middle graph's op-by-op supports must reach the first graph's run (each ran with a support table of its
    own: the first layer's gradient was NaN, with no warning)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    x[4:] = nan
    w1, w2 = torch.randn(4, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)
    fn = torch.compile(_twice_broken, backend="aot_eager")
    want = torch.autograd.grad(_twice_broken(w1, w2, x[:4]), (w1, w2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "grad":
            got = gw.grad(fn(w1, w2, x), (w1, w2))
        else:
            with gw.strong_zeros():
                fn(w1, w2, x).backward()
            got = (w1.grad, w2.grad)
    assert not [w for w in caught if issubclass(w.category, gw.GradwiseWarning)]
    _close(list(got), list(want))


def _read_by_two_graphs(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = x @ w
    torch._dynamo.graph_break()
    b = torch.exp(a)
    torch._dynamo.graph_break()
    return (b[:4] * a[:4]).sum()  # a reaches the last graph directly and through the middle one


def test_a_sensitivity_two_graphs_send():
    """The first graph's output is read by the second and the third: the engine adds their two results for it.
    That sum runs under the mode (the union of the supports the two graphs' op-by-op runs found), so the
    first graph's fallback sees the rows both made structurally zero (it saw a plain sum: NaN, with a warning)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    x[4:] = nan
    w = torch.randn(4, 3, requires_grad=True)
    fn = torch.compile(_read_by_two_graphs, backend="aot_eager")
    want = torch.autograd.grad(_read_by_two_graphs(w, x[:4]), w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gw.grad(fn(w, x), w)
    assert not [c for c in caught if issubclass(c.category, gw.GradwiseWarning)]
    _close(list(got), list(want))


@pytest.mark.parametrize("how", ["backward", "gw.backward", "gw.grad"])
def test_a_training_step_compiled_with_its_backward(how, monkeypatch):
    """The backward called inside the compiled function: dynamo graph-breaks there and compiles the frames the
    eager call enters, where is_compiling() reads True, so the plan took the real backward for a traced one
    (plain: the padding's NaN stayed, with a misleading PlainBackwardWarning once). gradwise's entry points are
    never traced by dynamo: the plan, spied on, never runs while dynamo compiles."""
    from gradwise._strong_zeros import _engine

    seen = []
    real_plan = _engine._plan

    def spied_plan(*args, **kwargs):
        seen.append(torch.compiler.is_dynamo_compiling())
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(_engine, "_plan", spied_plan)
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(4, 1)
    x = torch.cat([torch.randn(4, 4), torch.full((2, 4), nan)])

    @torch.compile(backend="aot_eager")
    def step(x):
        loss = lin(x)[:4].square().mean()
        if how == "gw.grad":
            lin.weight.grad = gw.grad(loss, lin.weight)[0]
        elif how == "gw.backward":
            gw.backward(loss)
        else:
            loss.backward()
        return loss

    (want,) = torch.autograd.grad(lin(x[:4]).square().mean(), lin.weight)
    with warnings.catch_warnings(record=True) as caught, gw.strong_zeros():
        warnings.simplefilter("always")
        step(x)
    assert not [c for c in caught if issubclass(c.category, gw.GradwiseWarning)]
    _close([lin.weight.grad], [want])
    assert seen and not any(seen), seen


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding-mask"])
def test_attention_discarding_nan_sequences_takes_the_pass(masked):
    """SDPA's CPU flash backward inside an inductor graph, a NaN sequence the loss discards: the pass replaces
    its query rows and keys as the eager rule does, so the compiled strong version is exact by itself (no
    op-by-op fallback); on finite data it is PyTorch's compiled gradient bit for bit."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    mask = None
    if masked:
        mask = torch.zeros(5, 5)
        mask[:, 4] = -math.inf  # a padded key, read by no query

    def loss(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:2].square().sum()

    fn = torch.compile(loss)
    clean = [torch.randn(3, 2, 5, 4, generator=gen) for _ in range(3)]
    padded = [t.clone() for t in clean]
    for t in padded:
        t[2] = nan  # the third sequence: NaN, and discarded by the loss

    def grads(ts, strong):
        ts = [t.clone().requires_grad_(True) for t in ts]
        if strong:
            with gw.strong_zeros():
                fn(*ts).backward()
        else:
            fn(*ts).backward()
        return [t.grad for t in ts]

    kept = [t[:2].clone().requires_grad_(True) for t in clean]
    loss(*kept).backward()
    want = [torch.cat([t.grad, torch.zeros(1, 2, 5, 4)]) for t in kept]  # the deleted sequence: zero gradient
    before = dict(_compile.STATS)
    got = grads(padded, True)
    assert _compile.STATS["eager"] == before["eager"]  # the compiled version sufficed
    _close(got, want)
    _equal(grads(clean, True), grads(clean, False))


def test_opaque_compiled_backward_warns(net):
    """A compiled backward whose graph gradwise cannot reach and that yields NaN: a warning names the node."""
    fn = torch.compile(lambda x: _loss(net, x, 5), backend="aot_eager")
    _grads(net, _data(), fn, strong=False)  # its backward compiled by PyTorch
    x = _data().requires_grad_(True)
    y = fn(x)
    node = _compile.compiled_nodes([y.grad_fn])[0]
    bc = _compile._backward_compiler(node)
    info, bc.lazy_backward_info = bc.lazy_backward_info, None
    try:
        with pytest.warns(_compile.CompiledBackwardWarning, match="CompiledFunctionBackward.*Fix"), \
                gw.strong_zeros():
            y.backward()
    finally:
        bc.lazy_backward_info = info
    with warnings.catch_warnings():  # with its graph back, no warning and the right gradient
        warnings.simplefilter("error")
        _close(_grads(net, _data(), fn, strong=True), _deleted(net, _data(), 5))


@pytest.mark.parametrize("tail", ["sqrt", "entropy"])
def test_a_masked_softmax_zero_is_structural_op_by_op(tail):
    """A softmax over a vocabulary masked with -inf, then a function with an infinite derivative at 0 (sqrt:
    Hellinger distance; xlogy: entropy). Inductor decomposes the softmax's backward into a product with its
    output: the op-by-op run puts the op back together, so its rule sees the output's exact zeros as
    structural, as eager strong zeros do. The gradient is that of the program with the banned tokens deleted."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, generator=gen), torch.randn(3, 5, generator=gen)
    banned = torch.tensor([False, True, False, False, True])
    f = (lambda p: p.sqrt().sum()) if tail == "sqrt" else (lambda p: -torch.xlogy(p, p).sum())

    def loss(w, banned):
        return f(torch.softmax((h @ w).masked_fill(banned, -math.inf), -1))

    fn = torch.compile(loss)
    w1 = w.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        (got,) = gw.grad(fn(w1, banned), w1)
    kept = w[:, ~banned].clone().requires_grad_(True)
    (part,) = torch.autograd.grad(loss(kept, banned[~banned]), kept)
    want = torch.zeros_like(w)
    want[:, ~banned] = part
    _close([got], [want])


def test_exp_output_zero_in_exps_own_backward_op_by_op():
    """Entropy over the actions a policy may take (MaskablePPO): log_softmax of -inf-masked logits, exp, entr.
    entr's derivative at p = exp(-inf) = 0 is infinite and exp's backward multiplies it by its saved output, 0:
    in eager strong zeros the product is exp's node's, whose exactly-0 output is structural. The compiled graph
    has a product with a saved value; AOTAutograd's node metadata (the forward op's sequence number on both)
    puts it back in exp's node for the op-by-op run. The gradient is that of the valid actions alone."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, generator=gen), torch.randn(3, 4, generator=gen)
    invalid = torch.tensor([[False, True, False, False], [False, False, False, True]])

    def loss(w, invalid):
        p = torch.log_softmax((h @ w).masked_fill(invalid, -math.inf), -1).exp()
        return torch.special.entr(p).sum()

    w1 = w.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        (got,) = gw.grad(torch.compile(loss, backend="aot_eager")(w1, invalid), w1)
    want = torch.zeros_like(w)
    for row in range(2):
        kept = w[:, ~invalid[row]].clone().requires_grad_(True)
        p = torch.log_softmax(h[row] @ kept, -1).exp()
        want[:, ~invalid[row]] += torch.autograd.grad(torch.special.entr(p).sum(), kept)[0]
    _close([got], [want])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_logcumsumexp_past_a_kept_prefix_op_by_op(backend):
    """logcumsumexp over a sequence whose NaN tail is sliced away (tinygrad#17853): its backward works in log
    space, where a structural g_i = 0 is the lowest float and meets the NaN result there. The compiled graph holds
    the formula decomposed; the op-by-op run puts it back together as one op, whose rule leaves those terms out,
    as the eager rule does at the formula's last op. The gradient is that of the kept prefix alone; a NaN inside
    the prefix stays."""
    fn = _scan_past_a_prefix(torch.logcumsumexp, torch.tensor([1.0, 2.0, 0.5, nan, nan]), backend)
    y = torch.tensor([1.0, nan, 0.5, 2.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.CompiledBackwardWarning)  # a genuine NaN: reported, and kept
        (got,) = gw.grad(fn(y), y)
    assert got[:2].isnan().all()


def test_cumprod_past_a_kept_prefix_under_inductor_op_by_op():
    """cumprod over a sequence whose NaN tail is sliced away: inductor's graph of its backward reverses with
    prims.rev, which the eager rules know as flip (an op only those graphs contain), so the sliced-away zeros
    keep their support through the reversed cumsum and the NaN meets them. Gradient of the kept prefix alone."""
    _scan_past_a_prefix(torch.cumprod, torch.tensor([2.0, 0.5, 3.0, nan, 4.0]), "inductor")


def _scan_past_a_prefix(scan, x, backend):
    """``scan(x, 0)[:3].sum()`` compiled, under gw.grad, equals the gradient of the 3-element prefix alone (0 past
    it) with no warning; returns the compiled function."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x: scan(x, 0)[:3].sum(), backend=backend)
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        (got,) = gw.grad(fn(x), x)
    kept = x.detach()[:3].clone().requires_grad_(True)
    (part,) = torch.autograd.grad(scan(kept, 0).sum(), kept)
    _close([got], [torch.cat([part, torch.zeros(x.shape[0] - 3)])])
    return fn


def test_a_formula_mask_saved_from_the_forward_is_a_selection_op_by_op():
    """nan_to_num as a NaN guard (pytorch#94700): its backward multiplies by isfinite(self), a mask the
    partitioner computes in the forward and saves when the forward value is not otherwise needed. AOTAutograd marks
    it as traced in the backward: the op-by-op run makes it a formula's selection again, so the replaced element's
    NaN meets a structural zero. The gradient is that of the program without the replaced element."""
    torch._dynamo.reset()

    def build():
        x = torch.tensor([0.7, -1.3], requires_grad=True)
        w = torch.tensor([math.nan, 2.0])
        return ((x * w).nan_to_num(0.0) + 3 * x).sum(), x

    out, x = torch.compile(build, backend="aot_eager")()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        (got,) = gw.grad(out, x)
    _close([got], [torch.tensor([3.0, 5.0])])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_logsumexp_over_log_zero_entries_op_by_op(backend):
    """logsumexp over log(p) with entries p = 0 (a log-space semiring's -inf): its backward weights
    exp(log p - result) are structural zeros there, so the later division by p = 0 meets a strong zero, as in
    eager strong zeros. The compiled graph's weights are an exp in the graph: its op-by-op run gives it the rule
    of logsumexp's node."""
    torch._dynamo.reset()
    p = torch.tensor([[0.0, 0.3, 0.7], [0.5, 0.0, 0.5]], requires_grad=True)
    fn = torch.compile(lambda p: torch.logsumexp(p.log(), 1).sum(), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        (got,) = gw.grad(fn(p), p)
    want = torch.zeros(2, 3)
    for row, kept in ((0, [1, 2]), (1, [0, 2])):
        part = p.detach()[row, kept].clone().requires_grad_(True)
        want[row, kept] = torch.autograd.grad(torch.logsumexp(part.log(), 0), part)[0]
    _close([got], [want])


@pytest.mark.parametrize("op", [torch.logaddexp, torch.logaddexp2], ids=["logaddexp", "logaddexp2"])
def test_logaddexp_of_log_zero_entries_op_by_op(op):
    """logaddexp(log p, log q) with entries p = 0 (an unreachable log-space state): its backward weight
    ``1 / (1 + exp(log q - log p))`` is exactly 0 there, a structural zero that the later division by p = 0 meets,
    as in eager strong zeros. The compiled graph's weight is a div in the graph: its op-by-op run gives it the rule
    of logaddexp's node, with the sub's operands as the node's saved arguments. Before, the NaN was kept."""
    torch._dynamo.reset()
    log = torch.log if op is torch.logaddexp else torch.log2
    p = torch.tensor([0.0, 0.3, 0.7, 0.2], requires_grad=True)
    q = torch.tensor([0.5, 0.1, 0.0, 0.4], requires_grad=True)
    fn = torch.compile(lambda p, q: op(log(p), log(q)).sum(), backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        got = gw.grad(fn(p, q), (p, q))
    # the program with the unreachable terms deleted: log q where p = 0, log p where q = 0
    ps, qs = p.detach()[1:2].clone().requires_grad_(True), q.detach()[1:2].clone().requires_grad_(True)
    pw, qw = p.detach()[3:].clone().requires_grad_(True), q.detach()[3:].clone().requires_grad_(True)
    q0, p2 = q.detach()[0:1].clone().requires_grad_(True), p.detach()[2:3].clone().requires_grad_(True)
    loss = op(log(ps), log(qs)).sum() + op(log(pw), log(qw)).sum() + log(q0).sum() + log(p2).sum()
    parts = torch.autograd.grad(loss, (ps, qs, pw, qw, q0, p2))
    want_p = torch.cat([torch.zeros(1), parts[0], parts[5], parts[2]])
    want_q = torch.cat([parts[4], parts[1], torch.zeros(1), parts[3]])
    _close(list(got), [want_p, want_q])


def test_a_zeros_buffer_saved_from_the_forward_is_structural_op_by_op():
    """Message passing over padded nodes (dense batching in graph libraries): messages gathered by index_select
    over the real edges, summed by index_add into a zeros buffer; the padded nodes' features are NaN and no edge
    reads them. Inductor's partitioner saves the forward's zeros buffer and the backward reuses it as the base of
    index_select's backward (an index_put into zeros): the op-by-op run makes those zeros again, structural as a
    formula's own. The gradient is that of the graph without the padded nodes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(4, 5).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    x[4:] = nan
    src, dst = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([1, 2, 0, 2, 3])

    def loss(x, n):
        agg = x.new_zeros(n, 5).index_add(0, dst, lin(x).index_select(0, src))
        return torch.relu(agg + lin(x))[:4].sum(0).square().sum()

    fn = torch.compile(loss)
    params = list(lin.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the NaN is removed, not reported
        got = gw.grad(fn(x, 6), params)
    _close(list(got), list(torch.autograd.grad(loss(x[:4], 4), params)))


def _zeroed_in_place(lin: nn.Module, x: torch.Tensor, how: str) -> torch.Tensor:
    h = lin(x)
    if how == "zero_":
        h[4:].zero_()
    else:
        h[4:].copy_(torch.zeros(4, 3))
    return (h * 2).square().sum()


@pytest.mark.parametrize(("how", "path"), [("zero_", "pass"), ("copy_", "pass"), ("zero_", "op_by_op")])
def test_rows_zeroed_in_place_before_a_use(how, path, monkeypatch):
    """NaN rows overwritten by zeros in place (h[4:].zero_()): inductor's partitioner saves the forward's zeros
    and the backward writes that saved tensor into the sensitivity (slice_scatter(g, full_default)). A backward
    is linear in its tangents, so a forward value it places into a sensitivity is a structural zero: the pass
    reads it as such (`_placed_value`), and so does the op-by-op run (`_graph_forms._saved_zeros`). Was a NaN
    gradient with a CompiledBackwardWarning."""
    if path == "op_by_op":
        monkeypatch.setattr(_compile, "_strong_variant", lambda bc: None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    x[4:] = nan
    fn = torch.compile(lambda t: _zeroed_in_place(lin, t, how))
    want = torch.autograd.grad(_zeroed_in_place(lin, x.nan_to_num(0.0), how), list(lin.parameters()))
    before = dict(_compile.STATS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(fn(x), list(lin.parameters()))
    assert (_compile.STATS["eager"] > before["eager"]) == (path == "op_by_op")
    _close(list(got), list(want))


# ---------------------------------------------------------------------------------------------------------
# The sweep: every contamination case, its build compiled (inductor and aot_eager), against eager strong zeros
# ---------------------------------------------------------------------------------------------------------

_ROOT = Path(__file__).resolve().parent
_CASE_FILES = [_ROOT.parent.parent / "shared" / "cases" / "contamination.py",
               *sorted((_ROOT / "reported").glob("contamination_round*.py"))]


def _load(path: Path) -> list:
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location(f"_compile_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.CASES


_CASES = [c for path in _CASE_FILES for c in _load(path)]

# (case, backend) where the compiled program keeps a NaN/Inf that eager strong zeros remove, and why: none in the
# full sweep (both backends; the logaddexp weights were the last, until their graph form, session 29). Never a
# different finite number, and never kept without a CompiledBackwardWarning: the sweep fails on either, and on a
# case listed here that no longer keeps its NaN.
KEPT_NAN: dict[tuple[str, str], str] = {}

# cases whose program gw.grad (an autograd.grad) cannot differentiate, in plain PyTorch too
NOT_GRAD = {"checkpoint-reentrant-block-nan-rows-sliced": "PyTorch: reentrant checkpoint is incompatible with .grad()"}

_TOL = {"rtol": 1e-4, "atol": 1e-5}  # the compiled program may sum in another order


@pytest.mark.slow
# dynamo reads .grad of non-leaf tensors while tracing the cases' builds (torch's own warning, not the case's)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_contamination_case_compiled(case, backend):
    if case.name in NOT_GRAD:
        pytest.skip(NOT_GRAD[case.name])
    out, ins, _ = case.build()
    want = gw.grad(out, ins, allow_unused=True)
    torch._dynamo.reset()
    compiled = torch.compile(case.build, backend=backend)
    try:
        out, ins, _ = compiled()
        torch.autograd.grad(out, ins, allow_unused=True)
    except Exception as exc:  # the program itself does not run compiled
        pytest.skip(f"torch.compile itself fails on this program: {type(exc).__name__}: {str(exc)[:120]}")
    out, ins, _ = compiled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gw.grad(out, ins, allow_unused=True)
    warned = any(issubclass(w.category, gw.CompiledBackwardWarning) for w in caught)
    kept = False
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            assert g is None and w is None
            continue
        both = g.isfinite() & w.isfinite()
        torch.testing.assert_close(g[both], w[both], **_TOL)  # never a different finite number
        assert not (g.isfinite() & ~w.isfinite()).any(), "a genuine NaN/Inf of the eager result disappeared"
        assert (g.isnan() == w.isnan())[~w.isfinite()].all()
        kept |= bool((~g.isfinite() & w.isfinite()).any())
    key = (case.name, backend)
    assert kept == (key in KEPT_NAN), KEPT_NAN.get(key, "kept a NaN/Inf eager strong zeros remove")
    assert warned or not kept, "a NaN/Inf eager strong zeros remove was kept without a warning"


@pytest.mark.slow
def test_aot_autograd_cache_hit(net):
    """A backward loaded from AOTAutograd's cache (no graph metadata to compile a strong version from): its graph
    runs op by op on a NaN, with the cache's constant zeros made structural again; the gradient is right."""
    fn_source = lambda x: _loss(net, x, 5)  # one code object, compiled twice
    with torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):  # the second compile hits the cache the first one filled
            torch._dynamo.reset()
            fn = torch.compile(fn_source)
            x = _data()
            before = dict(_compile.STATS)
            _close(_grads(net, x, fn, strong=True), _deleted(net, x, 5))
    node = _compile.compiled_nodes([fn(_data().requires_grad_(True)).grad_fn])[0]
    info = _compile._backward_compiler(node).lazy_backward_info
    if type(info).__name__ != "CachedAutogradLazyBackwardCompileInfo":
        pytest.skip("AOTAutograd's cache did not serve the second compile on this machine")
    assert _compile.STATS["eager"] > before["eager"]


def _operand_copies(loss, *inputs) -> int:
    """How many matmuls of ``loss``'s backward graph (inductor's decompositions, AOTAutograd's partition) the pass
    gives a rewritten operand."""
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.decomposition import select_decomp_table

    from gradwise._strong_zeros import _compile_pass

    mm = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    counts = []

    def backward(gm, _):
        before = {n: tuple(n.args[:2]) for n in gm.graph.nodes if n.target in mm}
        _compile_pass.rewrite_backward(gm.graph)
        counts.append(sum(tuple(n.args[:2]) != args for n, args in before.items()))
        gm.recompile()
        return make_boxed_func(gm)

    fn = aot_function(loss, fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=backward,
                      decompositions=select_decomp_table())
    fn(*inputs).backward()
    return counts[0]


def test_relu_zeros_make_no_copy_of_a_matmul_operand():
    """A matmul's value operand is copied (rows zeroed where only structural zeros read them) for zeros a formula
    placed, not for relu's dead units (inductor's where(x <= 0, 0, g)): those copies cost the compiled transformer
    layer 15% and bought nothing (a NaN there stays in the result, and the runtime check runs the node op by op)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    w1, w2 = (torch.randn(s, generator=g).requires_grad_() for s in ((16, 8), (4, 16)))
    mlp = lambda act: lambda x, w1, w2: act(x @ w1.T) @ w2.T
    assert _operand_copies(lambda *a: mlp(torch.relu)(*a).square().mean(), x, w1, w2) == 0
    assert _operand_copies(lambda *a: mlp(torch.relu)(*a)[:3].square().mean(), x, w1, w2) > 0  # the slice's
    assert _operand_copies(lambda *a: mlp(torch.tanh)(*a)[:3].square().mean(), x, w1, w2) > 0


def _forward_zeros_loss(x, s):
    z = torch.zeros_like(x)  # a forward value: x * z really uses x, and the output is NaN through s
    return (x * z).sum() * s + torch.where(x > 0, x.abs().sqrt(), 0.0).sum()  # (where's zeros: structural)


def test_forward_zeros_recomputed_in_the_backward_are_values():
    """The partitioner recomputes a cheap forward ``zeros_like`` inside the backward graph; the pass took it for a
    formula's zeros and ``g * zeros`` dropped the genuine NaN of d/dx ((x * 0).sum() * NaN: NaN in eager PyTorch
    and in eager gradwise) silently. Run through the pass (min-cut partition, inductor's decompositions, the
    rewritten graph run as is), and op by op under aot_eager, the NaN stays."""
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    from gradwise._strong_zeros import _compile_pass

    x, s = torch.tensor([1.0, -2.0, 0.0, 3.0], requires_grad=True), torch.tensor(nan, requires_grad=True)
    (want,) = gw.grad(_forward_zeros_loss(x, s), x)
    assert want.isnan().all()
    finite = torch.tensor(2.0, requires_grad=True)
    (clean,) = gw.grad(_forward_zeros_loss(x, finite), x)  # where's NaN at 0 removed, as eagerly
    assert clean.isfinite().all()

    def backward(gm, _):
        _compile_pass.rewrite_backward(gm.graph)
        gm.recompile()
        return make_boxed_func(gm)

    fn = aot_function(_forward_zeros_loss, fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=backward,
                      partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    (got,) = torch.autograd.grad(fn(x, s), x)
    assert got.isnan().all()
    assert torch.equal(torch.autograd.grad(fn(x, finite), x)[0], clean)
    torch._dynamo.reset()
    compiled = torch.compile(_forward_zeros_loss, backend="aot_eager")
    with pytest.warns(gw.CompiledBackwardWarning):  # (NaN after a compiled backward: the user is told)
        (got,) = gw.grad(compiled(x, s), x)
    assert got.isnan().all()
    assert torch.equal(gw.grad(compiled(x, finite), x)[0], clean)


def test_a_strong_variant_that_gcc_refuses_runs_compiled_without_vectorization(monkeypatch):
    """Inductor's CPU vectorizer can emit code that g++ refuses for the pass's bool masks (a Llama layer's
    rotary backward: '?:' of VecMask<int> and VecMask<float>): the backward then ran op by op, every step, with a
    warning. Simulated here (the pass fails while vectorization is on): the strong variant is compiled without
    it; finite gradients are PyTorch's within rounding, padding NaN goes through it, compiled (no op-by-op), to
    the deleted program's gradient."""
    from gradwise._strong_zeros import _compile_pass

    real = _compile_pass.rewrite_backward

    def refused(graph):
        if torch._inductor.config.cpp.simdlen != 1:
            raise RuntimeError("C++ compile error (simulated: g++ refuses the vectorized kernel)")
        return real(graph)

    monkeypatch.setattr(_compile_pass, "rewrite_backward", refused)
    torch._dynamo.reset()
    net = _Net()
    with torch._inductor.config.patch(fx_graph_cache=False):
        fn = torch.compile(lambda x: _loss(net, x, 5))
        finite = _data(pad=3.0).abs() + 0.5
        plain = _grads(net, finite, fn, strong=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", gw.CompiledBackwardWarning)
            _close(_grads(net, finite, fn, strong=True), plain)
            before = dict(_compile.STATS)
            x = _data()
            _close(_grads(net, x, fn, strong=True), _deleted(net, x, 5))
    assert _compile.STATS["eager"] == before["eager"]
    torch._dynamo.reset()


@pytest.mark.slow
def test_llama_layer_compiles_with_strong_zeros():
    """The graph that made g++ refuse the vectorized strong variant: a 1-layer Llama (GQA, rotary, SDPA) with a
    padding mask and a dropped sample full of NaN. Finite: PyTorch's compiled gradient within rounding; NaN:
    compiled (no op-by-op run), equal to the program on the kept samples."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=16, max_position_embeddings=16,
                                   attn_implementation="sdpa")
    llama = transformers.LlamaModel(cfg)
    params = list(llama.parameters())[1:]  # (the token embedding is unused: inputs_embeds)
    tok = torch.tensor([[True] * 5, [True] * 5, [True] * 3 + [False] * 2])
    keep = torch.tensor([True, False, True])

    def loss(x, tok=tok, keep=keep):
        out = llama(inputs_embeds=x, attention_mask=tok.long()).last_hidden_state
        return torch.where((tok & keep[:, None])[..., None], out, 0.0).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss)
    x = torch.randn(3, 5, 8)
    plain = torch.autograd.grad(compiled(x), params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.CompiledBackwardWarning)
        for a, b in zip(gw.grad(compiled(x), params), plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        bad = x.clone()
        bad[1] = nan
        before = dict(_compile.STATS)
        got = gw.grad(compiled(bad), params)
    assert _compile.STATS["eager"] == before["eager"]
    want = torch.autograd.grad(loss(x[[0, 2]], tok[[0, 2]], keep[[0, 2]]), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_a_whole_compiled_step_is_planned_without_walking_the_zero_reach(monkeypatch):
    """A graph of compiled backwards and leaves only (the whole loss compiled) has nothing outside its graphs to
    read: the plan says 'compiled' at once (the walk of where zeros reach cost ~5% of a compiled MLP step), as
    the full plan does, and a graph with eager nodes still gets the full plan."""
    from gradwise._strong_zeros import _planning

    torch._dynamo.reset()
    lin = nn.Linear(4, 3)
    whole = torch.compile(lambda x: lin(x)[:2].relu().sum(), backend="aot_eager")
    part = torch.compile(lambda x: lin(x), backend="aot_eager")
    x = _data(4, 2)[:, :4].contiguous()
    walked = []
    real = _planning._zero_reach
    monkeypatch.setattr(_planning, "_zero_reach", lambda *a: walked.append(1) or real(*a))
    assert _plan([whole(x)], ()) == "compiled" and not walked
    monkeypatch.setattr(_planning, "_COMPILED_ONLY", frozenset())
    monkeypatch.setattr(_planning, "_SHAPED", {})  # (the plan of this graph's shape is kept: plan it afresh)
    assert _plan([whole(x)], ()) == "compiled" and walked  # the full plan agrees
    walked.clear()
    monkeypatch.undo()
    monkeypatch.setattr(_planning, "_zero_reach", lambda *a: walked.append(1) or real(*a))
    assert _plan([part(x)[:2].sum()], ()) in ("compiled", "strong") and walked


def test_the_compiled_variant_checks_its_own_gradients(monkeypatch):
    """The strong variant returns one output more, whether its gradients are finite (a sum per gradient inside the
    compiled graph, next to where it is made): a finite backward reads no gradient back (that read was ~4% of a
    compiled MLP step), its gradients are the plain compiled ones bit for bit, and a NaN the output uses still
    makes the node run op by op and stay, with the warning compiled code gets."""
    from gradwise._strong_zeros import _planning

    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    fn = torch.compile(lambda x: lin(x)[:2].square().sum())
    x = torch.randn(4, 4)
    want = torch.autograd.grad(fn(x), list(lin.parameters()))
    with gw.strong_zeros():
        fn(x).backward()  # compiles the variant
    reads = []
    real = _planning._all_finite
    monkeypatch.setattr(_planning, "_all_finite", lambda ts: reads.append(len(ts)) or real(ts))
    lin.zero_grad(set_to_none=True)
    with gw.strong_zeros():
        fn(x).backward()
    assert not reads
    assert all(torch.equal(p.grad, w) for p, w in zip(lin.parameters(), want, strict=True))
    bad = x.clone()
    bad[0, 0] = nan  # a row the loss reads: genuine
    lin.zero_grad(set_to_none=True)
    with pytest.warns(gw.CompiledBackwardWarning), gw.strong_zeros():
        fn(bad).backward()
    assert lin.weight.grad.isnan().any()


def test_threads_plain_beside_strong_stay_plain():
    """A strong-zero backward swaps a compiled node's backward for its own variant on its own thread only: plain
    backwards of the same compiled function on other threads keep PyTorch's result (the NaN of the discarded
    rows), also while two strong threads interleave, and none stays swapped afterwards (the shared attribute was
    swapped for everyone, and two strong threads could leave a variant installed for good)."""
    import threading

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    params = list(lin.parameters())
    x = torch.randn(6, 4)
    x[4:] = math.nan
    f = torch.compile(lambda t: lin(t)[:4].square().sum(), backend="aot_eager")
    want = gw.grad(lin(x[:4]).square().sum(), params)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        assert not torch.autograd.grad(f(x), params)[0].isfinite().all()
        results = {"strong": [], "plain": []}

        def strong():
            for _ in range(25):
                with gw.strong_zeros():
                    results["strong"].append(gw.grad(f(x), params))

        def plain():
            for _ in range(25):
                results["plain"].append(torch.autograd.grad(f(x), params))

        threads = [threading.Thread(target=t) for t in (strong, strong, plain)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results["strong"]) == 50 and len(results["plain"]) == 25
        for grads in results["strong"]:
            for g, w in zip(grads, want, strict=True):
                torch.testing.assert_close(g, w)
        assert all(not g[0].isfinite().all() for g in results["plain"])
        assert not torch.autograd.grad(f(x), params)[0].isfinite().all()  # nothing left swapped


def test_a_folded_zero_times_a_value_is_a_value_op_by_op():
    """Inductor folds ``tangent * 0`` into a constant ``full(0)`` that multiplies a forward value: no sensitivity
    reads it, so the pass gives it no support, and the op-by-op run (after the pass's result held the genuine
    NaN of 0 x Inf) took it for a formula's structural zero and returned a finite gradient, silently; eager
    gw.grad and plain PyTorch give NaN."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x, inf = torch.randn(4, 4), torch.tensor(math.inf)

    def loss(x):
        return (lin(x) * inf).sum() * 0 + lin(x).sum()

    assert gw.grad(loss(x), lin.weight)[0].isnan().all()
    compiled = torch.compile(loss)
    with torch._functorch.config.patch(enable_autograd_cache=False), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = gw.grad(compiled(x), lin.weight)[0]
    assert got.isnan().all()
    assert any(isinstance(w.message, gw.CompiledBackwardWarning) for w in seen)


@torch.library.custom_op("gwtest::scale_rows", mutates_args=())
def _scale_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w


@_scale_rows.register_fake
def _(x, w):
    return torch.empty_like(x)


@torch.library.custom_op("gwtest::scale_rows_backward", mutates_args=())
def _scale_rows_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    return [g * w, (g * x).sum(0)]


@_scale_rows_backward.register_fake
def _(g, x, w):
    return [torch.empty_like(g), torch.empty_like(w)]


def _scale_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scale_rows_bwd(ctx, g):
    x, w = ctx.saved_tensors
    gx, gw_ = _scale_rows_backward(g, x, w)
    return gx, gw_


_scale_rows.register_autograd(_scale_rows_bwd, setup_context=_scale_rows_setup)


def test_a_kept_nan_names_the_unruled_ops_every_time():
    """A custom op without a strong-zero rule inside compiled code keeps the padding's NaN: the first backward names
    it (OpaqueBackwardWarning); later ones said only that some zeros may arrive as saved values, not the op."""
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(6, 4)
    x[4:] = math.nan
    compiled = torch.compile(lambda x: _scale_rows(x, w)[:4].square().sum(), backend="aot_eager")
    with torch._functorch.config.patch(enable_autograd_cache=False):
        for _ in range(2):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                got = gw.grad(compiled(x), w)[0]
            assert got.isnan().any()  # (an op without a rule: the NaN stays, never a wrong finite number)
            texts = [str(m.message) for m in seen if isinstance(m.message, gw.GradwiseWarning)]
            assert any("gwtest.scale_rows_backward" in t or "gwtest::scale_rows_backward" in t for t in texts), texts


def test_a_plain_compile_on_another_thread_gets_no_pass():
    """While a strong variant compiles, the pass is in ``post_grad_custom_pre_pass`` (``_with_pass``): a plain
    ``torch.compile`` on another thread must not read it (its backward would get strong zeros and the finite
    flag's extra output: a silent change of plain PyTorch, or a crash). It does not, because torch 2.13's
    ``config.patch`` is thread-local (ContextVar overrides); this guards that fact, which ``_with_pass``
    relies on."""
    import threading

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    x[4:] = math.nan
    f = torch.compile(lambda t: lin(t)[:4].sum())
    out: dict[str, object] = {}

    def plain() -> None:
        try:
            out["grad"] = torch.autograd.grad(f(x), lin.weight)[0]
        except Exception as exc:  # (reported below, with the thread's own error)
            out["error"] = exc

    with (torch._functorch.config.patch(enable_autograd_cache=False),
          torch._inductor.config.patch(fx_graph_cache=False), _compile._with_pass(checked=True)):
        thread = threading.Thread(target=plain)
        thread.start()
        thread.join()
    assert "error" not in out, out.get("error")
    assert out["grad"].isnan().any()  # PyTorch's own result: the discarded rows' NaN
