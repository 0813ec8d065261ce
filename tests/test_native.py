"""gw.watch()'s C++ helper (`gradwise._native`) against its Python twins and PyTorch itself: the same leaves in
the same order as the Python walk, saved tensors freed as the engine frees them, and a finiteness scan that
agrees with ``torch.isfinite`` on every dtype, layout and special value; the fall-backs when it is off, failed
or being built elsewhere."""
from __future__ import annotations

import gc
import shutil
import subprocess
import sys
import time
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from gradwise import _native, _strong_zeros
from test_contract import _Double  # (a custom Function saving its input)


def _helper():
    mod = _native.module()
    if mod is None:
        if shutil.which("ninja") is None or shutil.which("c++") is None:
            pytest.skip("no C++ compiler or ninja on this machine: gw.watch() runs its Python twin")
        log = _native.build_dir() / "build.log"
        pytest.fail(f"the C++ helper did not build (state {_native._state}); "
                    f"{log.read_text()[-3000:] if log.exists() else 'no log'}")
    return mod


def _programs():
    """name -> a function of fresh leaves returning the outputs a backward is called on."""
    def mlp():
        lin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        return (lin(torch.randn(3, 4)).sum(),)

    def diamond():
        a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
        h = (a * b).exp()
        return ((h.sin() + h.cos() * a).sum(),)

    def two_outputs():
        a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
        return (a.sum() * 2, (a * b).sum(), torch.ones(2))

    def leaf_output():
        a = torch.randn((), requires_grad=True)
        return (a, (a * a.exp()))

    def custom():
        a = torch.randn(3, requires_grad=True)
        return (_Double.apply(a.exp()).sum(),)

    def in_place_view():
        a, b = torch.randn(4, requires_grad=True), torch.randn(2, requires_grad=True)
        c = a * 1
        c[:2].mul_(b)
        return (c.sum(),)

    def checkpointed():
        lin = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4, requires_grad=True)
        return (checkpoint(lambda t: lin(t).tanh(), x, use_reentrant=False).sum(),)

    def reentrant():
        lin = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4, requires_grad=True)
        return (checkpoint(lambda t: lin(t).tanh(), x, use_reentrant=True).sum(),)

    return {f.__name__: f for f in (mlp, diamond, two_outputs, leaf_output, custom, in_place_view, checkpointed,
                                     reentrant)}


@pytest.mark.parametrize("name", sorted(_programs()))
def test_walk_finds_the_leaves_of_the_python_walk_in_its_order(name):
    mod = _helper()
    outs = _programs()[name]()
    python = _strong_zeros._graph_parts(_strong_zeros._root_nodes(outs))[0]
    native = mod.walk(list(outs))[0]
    assert [id(t) for t in native] == [id(t) for t in python] and python


@pytest.mark.parametrize("name", sorted(_programs()))
def test_release_frees_what_the_engine_frees(name):
    """After a kept backward and the release, a second backward raises PyTorch's own error, as after a plain
    backward."""
    mod = _helper()
    torch.manual_seed(0)
    plain = _programs()[name]()
    torch.autograd.backward([t for t in plain if t.requires_grad])
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as expected:
        torch.autograd.backward([t for t in plain if t.requires_grad and t.grad_fn is not None])
    outs = [t for t in _programs()[name]() if t.requires_grad]
    _, nodes = mod.walk(outs)
    torch.autograd.backward(outs, retain_graph=True)
    mod.release(nodes)
    with pytest.raises(RuntimeError) as got:
        torch.autograd.backward([t for t in outs if t.grad_fn is not None])
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("how", ["plain", "custom Function", "checkpoint", "save_on_cpu"])
def test_release_drops_the_saved_intermediates(how):
    """An intermediate only the graph holds dies at the release, as at the end of a plain backward (the Python
    twin leaves a checkpoint's or save_on_cpu's packed slots to die with the graph; the engine, and the helper,
    free them)."""
    mod = _helper()
    w = torch.randn(64, requires_grad=True)

    def program():
        h = (w * 3).exp()
        ref = weakref.ref(h)
        if how == "custom Function":
            out = _Double.apply(h)
        elif how == "checkpoint":
            out = checkpoint(lambda t: t.sin() * t, h, use_reentrant=False)
        elif how == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                out = h.sin() * h
        else:
            out = h.sin() * h
        return out.sum(), ref

    loss, ref = program()
    loss.backward()
    gc.collect()
    assert ref() is None, "premise: a plain backward frees it"
    loss, ref = program()
    _, nodes = mod.walk([loss])
    loss.backward(retain_graph=True)
    gc.collect()
    assert ref() is not None, "premise: a kept graph holds it"
    mod.release(nodes)
    gc.collect()
    assert ref() is None


_SPECIAL = [float("nan"), float("inf"), -float("inf")]
_FINITE_EDGE = [0.0, -0.0, 1e-40, -1e-45, 65504.0, 3.0e38, -1.7e308, 1.0]


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
                              torch.complex128, torch.complex32]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
       layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "conj", "neg"]),
       finite=st.lists(st.sampled_from(_FINITE_EDGE), min_size=1, max_size=4),
       special=st.one_of(st.none(), st.tuples(st.sampled_from(_SPECIAL), st.integers(0, 10 ** 6))))
def test_scan_agrees_with_isfinite(dtype, shape, layout, finite, special):
    mod = _helper()
    values = torch.tensor(finite * (1 + 2 * max(1, torch.Size(shape).numel()) // len(finite)), dtype=torch.float64)
    n = torch.Size(shape).numel() * (2 if dtype.is_complex else 1)
    flat = values[:n].clone()
    if special is not None and n:
        flat[special[1] % n] = special[0]
    with warnings.catch_warnings():  # ("ComplexHalf support is experimental")
        warnings.simplefilter("ignore", UserWarning)
        t = (torch.view_as_complex(flat.reshape(-1, 2)) if dtype.is_complex else flat).to(dtype).reshape(shape)
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, -1)
    elif layout == "sliced" and t.dim() >= 1:
        t = t[::2]
    elif layout == "expanded":
        t = t.unsqueeze(0).expand(2, *t.shape)
    elif layout == "conj" and dtype.is_complex:
        t = t.conj()
    elif layout == "neg" and dtype.is_complex:
        t = t.conj().imag if dtype is not torch.complex32 else t
    got = mod.finite_or_rest([t])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        finite_all = bool(torch.isfinite(t).all())
    if got is False:
        assert not finite_all
    else:
        assert finite_all or any(r is t for r in got), "a NaN/Inf passed as finite (SILENT)"


def _freed_storage() -> torch.Tensor:
    t = torch.ones(1 << 16)
    t.untyped_storage().resize_(0)
    return t


@pytest.mark.parametrize("make", [
    pytest.param(lambda: torch.full((3,), float("nan"), device="meta"), id="meta"),
    pytest.param(lambda: torch.tensor([[0.0, float("nan")]]).to_sparse(), id="sparse"),
    pytest.param(lambda: torch.arange(3), id="int"),
    pytest.param(lambda: torch._efficientzerotensor(3), id="ZeroTensor"),
    pytest.param(lambda: torch.ones(4)[::2], id="strided"),
    pytest.param(lambda: torch.ones(1).expand(4), id="expanded"),
    pytest.param(lambda: _freed_storage(), id="storage resized to 0 (FSDP's unsharded parameters)"),
])
def test_scan_leaves_what_it_cannot_read_to_python(make):
    t = make()
    assert _helper().finite_or_rest([t]) == [t] or _helper().finite_or_rest([t])[0] is t


def test_scan_leaves_fake_and_functorch_tensors_to_python():
    mod = _helper()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(3))
    assert mod.finite_or_rest([fake])[0] is fake
    seen = []
    torch.func.vmap(lambda t: seen.append(mod.finite_or_rest([t])) or t)(torch.ones(2, 3))
    assert len(seen[0]) == 1


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """The helper's per-process state, as before the first `module()`, with its folder in tmp_path."""
    monkeypatch.setenv("GRADWISE_NATIVE_DIR", str(tmp_path))
    for name, value in (("_module", None), ("_state", "unknown"), ("_builder", None), ("_next_look", 0.0)):
        monkeypatch.setattr(_native, name, value)
    return _native.build_dir()


def test_off_when_disabled(fresh_state, monkeypatch):
    monkeypatch.setenv("GRADWISE_NATIVE", "0")
    assert _native.module() is None and _native._state == "off" and not fresh_state.exists()


def test_a_bad_setting_is_refused(fresh_state, monkeypatch):
    monkeypatch.setenv("GRADWISE_NATIVE", "fast")
    with pytest.raises(ValueError, match="GRADWISE_NATIVE must be 0 or 1"):
        _native.module()


def test_a_failed_build_is_not_retried(fresh_state, monkeypatch):
    fresh_state.mkdir(parents=True)
    (fresh_state / "failed").write_text("no compiler\n")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a failed build was started again"))
    assert _native.module() is None and _native._state == "failed"


def test_one_build_per_folder(fresh_state, monkeypatch):
    """Another process's fresh ``building`` marker: no second build (the ranks of a job); a stale one (a build that
    died): built again."""
    started = []

    class _Popen:
        def __init__(self, args, **kwargs):
            started.append(args)

        def poll(self):
            return None

    monkeypatch.setattr(subprocess, "Popen", _Popen)
    fresh_state.mkdir(parents=True)
    (fresh_state / "building").write_text("1\n")
    assert _native.module() is None and _native._state == "building" and not started
    monkeypatch.setattr(_native, "_state", "unknown")
    old = time.time() - 2 * _native._STALE_S
    import os

    os.utime(fresh_state / "building", (old, old))
    assert _native.module() is None and started == [[sys.executable, str(_native._SOURCE.with_name("__main__.py")),
                                                      str(fresh_state)]]


def test_build_native_command():
    _helper()
    done = subprocess.run([sys.executable, "-m", "gradwise", "build-native"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr


def test_a_build_that_died_unmarked_ends_the_wait(fresh_state, monkeypatch):
    """Our build process ended (killed) without ``ready`` or ``failed``: the Python path from then on, instead of a
    file check every 2 s for the rest of the process."""
    class _Dead:
        def __init__(self, args, **kwargs):
            pass

        def poll(self):
            return -9

    monkeypatch.setattr(subprocess, "Popen", _Dead)
    assert _native.module() is None and _native._state == "building"
    monkeypatch.setattr(_native, "_next_look", 0.0)
    assert _native.module() is None and _native._state == "failed"


def _branches():
    """A graph with branches toward different leaves: out = f(a) * g(b) + h(a, c); each branch saves tensors."""
    a, b, c = (torch.randn(4, requires_grad=True) for _ in range(3))
    ea = a.exp()
    parts = [(ea * b.sin()).sum(), (ea.cos() * c).sum(), (b * c).tanh().sum()]
    return parts, {"a": a, "b": b, "c": c, "ea": ea}


@pytest.mark.parametrize("path", ["helper", "Python twin"])
@pytest.mark.parametrize("wanted", [("a",), ("b",), ("c",), ("a", "c"), ("ea",), ("ea", "b"), ("a", "ea")])
def test_release_toward_inputs_frees_what_the_engine_frees(wanted, path):
    """autograd.grad toward some inputs runs (and frees) only the nodes on their paths: after the helper's release
    each later autograd.grad toward one tensor succeeds or raises exactly as after PyTorch's own call."""
    mod = _helper()

    def later(kept: bool) -> list[str]:
        torch.manual_seed(0)
        parts, named = _branches()
        out = parts[0] + parts[1] + parts[2]
        inputs = [named[n] for n in wanted]
        if kept:
            torch.autograd.grad(out, inputs, retain_graph=True)
            if path == "helper":
                mod.release(mod.toward([out], inputs))
            else:
                _strong_zeros._release(_strong_zeros._saved_toward(_strong_zeros._root_nodes([out]), inputs))
        else:
            torch.autograd.grad(out, inputs)
        results = []
        for k, part in enumerate(parts):
            for name in sorted(named):
                try:
                    torch.autograd.grad(part, named[name], retain_graph=True, allow_unused=True)
                    results.append(f"{k} {name}: ok")
                except RuntimeError as exc:
                    results.append(f"{k} {name}: {str(exc)[:40]}")
        return results

    plain = later(False)
    assert any(r.endswith("ok") for r in plain) and not all(r.endswith("ok") for r in plain)
    assert later(True) == plain
