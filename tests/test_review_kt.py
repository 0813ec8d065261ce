"""Review of the branch known_trace (session 27): gw.watch() must not replay a hook of any kind (a library's, the
deprecated module backward hook, a multi-grad hook), a library's custom Function is no hook, and a genuine
finding's count over several steps is the NaN gw.strong_zeros() leaves. References: the same program without
gw.watch() (how often each hook ran), gw.strong_zeros()' gradients summed over the steps."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradwise as gw

NAN = float("nan")

_LIBRARY = '''
import torch


class GradLogger:
    """A library logging gradients through tensor hooks (as wandb.watch does)."""

    def __init__(self, module):
        self.seen = []
        for p in module.parameters():
            p.register_hook(self.log)

    def log(self, g):
        self.seen.append(1)


class NanBackward(torch.autograd.Function):
    """A library's custom Function whose backward makes NaN."""

    @staticmethod
    def forward(ctx, a):
        return a * 1

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")
'''


@pytest.fixture
def library(tmp_path, monkeypatch):
    """A module installed in a site-packages folder (gradwise reads such a file as a library's, not the user's)."""
    root = tmp_path / "site-packages"
    root.mkdir()
    (root / "kt_fakelib.py").write_text(textwrap.dedent(_LIBRARY))
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("kt_fakelib", None)
    yield importlib.import_module("kt_fakelib")
    sys.modules.pop("kt_fakelib", None)


class _Counter:
    def __init__(self, calls):
        self.calls = calls

    def __call__(self, *args):
        self.calls.append(1)

    def method(self, *args):
        self.calls.append(1)


def _count(calls, *args):
    calls.append(1)


_HOOKS = {  # registered before the forward: (x, lin, calls) -> None
    "deprecated module backward hook": lambda x, lin, c: lin.register_backward_hook(lambda m, gi, go: c.append(1)),
    "multi-grad hook, any": lambda x, lin, c: torch.autograd.graph.register_multi_grad_hook(
        (x, lin.weight), lambda g: c.append(1), mode="any"),
    "module full backward pre-hook": lambda x, lin, c: lin.register_full_backward_pre_hook(lambda m, g: c.append(1)),
    "callable object": lambda x, lin, c: x.register_hook(_Counter(c)),
    "bound method": lambda x, lin, c: x.register_hook(_Counter(c).method),
    "functools.partial": lambda x, lin, c: x.register_hook(functools.partial(_count, c)),
    "lambda": lambda x, lin, c: x.register_hook(lambda g: c.append(1)),
    "a library's (site-packages) hook": None,
    "saved-tensor unpack hook": "unpack",
}


def _step(where, watch, library=None):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    calls: list = []
    x = torch.cat((torch.randn(2, 3), torch.full((2, 3), NAN))).requires_grad_()
    logger = None
    if _HOOKS[where] is None:
        logger = library.GradLogger(lin)
    elif _HOOKS[where] != "unpack":
        _HOOKS[where](x, lin, calls)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: calls.append(1) or t) \
        if _HOOKS[where] == "unpack" else contextlib.nullcontext()
    with gw.watch() if watch else contextlib.nullcontext() as report:
        with hooks:
            y = lin(x)
        y[:2].sum().backward()
    return len(logger.seen) if logger is not None else len(calls), report


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")  # (the deprecated hook's)
@pytest.mark.parametrize("where", list(_HOOKS))
def test_watch_runs_no_hook_twice(where, library):
    """known_trace: the deprecated Module.register_backward_hook (run through nn/modules/module.py's _WrappedHook),
    a multi-grad hook (autograd/graph.py) and a library's hook (site-packages) ran twice under gw.watch()."""
    plain, _ = _step(where, False, library)
    watched, report = _step(where, True, library)
    assert plain > 0
    assert watched == plain, report
    assert "which a replay would run a second time" in report.notes[0], report
    assert sys.gettrace() is None and sys.getprofile() is None


@pytest.mark.xfail(strict=True, reason="a builtin used as a hook (list.append) has no Python frame: neither "
                   "sys.settrace nor sys.setprofile sees the engine call it, so the replay runs it again")
def test_watch_runs_a_builtin_hook_once():
    def step(watch):
        grads: list = []
        x = torch.tensor([1.0, -1.0], requires_grad=True)
        x.register_hook(grads.append)
        with gw.watch() if watch else contextlib.nullcontext():
            x.sqrt()[:1].sum().backward()  # x.grad [0.5, nan]
        return len(grads)
    assert step(True) == step(False)


def test_watch_sees_hooks_under_a_profiler_and_leaves_it_set():
    """A profile function already set (cProfile's, torch.profiler's with_stack): known_trace then ran the hooks
    again. The replay watches with sys.settrace instead, and the profiler stays as it was."""
    def prof(frame, event, arg):
        return None
    sys.setprofile(prof)
    try:
        plain, _ = _step("lambda", False)
        watched, report = _step("lambda", True)
        assert sys.getprofile() is prof
    finally:
        sys.setprofile(None)
    assert watched == plain, report


def test_a_hook_stopping_the_replay_leaves_the_engine_usable():
    """The replay stopped by an exception inside the engine: the next steps run and are traced."""
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    x.register_hook(lambda g: g)
    with gw.watch() as report:
        for _ in range(3):
            x.grad = None
            x.sqrt()[:1].sum().backward()
    assert x.grad[0].item() == 0.5 and x.grad[1].isnan() and sys.gettrace() is None
    assert report.findings, report


def test_a_librarys_custom_function_is_no_hook(library, tmp_path):
    """known_trace: a NaN made in the backward of a library's custom Function was born at 'hook <module>' (the
    frame walk started at the user's backward call, outside the engine, and took the script's outermost frame;
    under pytest its frames are a library's, hence a script of its own)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch, gradwise as gw, kt_fakelib
        x = torch.ones(3, requires_grad=True)
        with gw.trace() as report:
            kt_fakelib.NanBackward.apply(x).sum().backward()
        [f] = report.findings
        print(f.kind, "|", f.op, "|", f.born)
    """))
    paths = [os.path.dirname(gw.__path__[0]), os.path.dirname(library.__file__)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True,
                         cwd=tmp_path).stdout
    kind, op, born = out.strip().split(" | ")
    assert kind == "nan" and not op.startswith("hook") and "hook" not in born, out


def test_genuine_count_over_steps_is_what_strong_zeros_leave():
    """sqrt of negatives, the output keeping rows 0-1: step 0's NaN are in the kept rows, steps 1-2's in the dropped
    ones. known_trace counted the genuine finding 6 (every step's born NaN) where gw.strong_zeros() leaves 2 NaN
    in the three gradients, and genuine + contamination (10) exceeded the plain gradients' NaN (6)."""
    xs = [torch.tensor([-1.0, -1.0, 4.0, 4.0]), torch.tensor([4.0, 4.0, -1.0, -1.0]),
          torch.tensor([4.0, 4.0, -1.0, -1.0])]
    plain = strong = 0
    with gw.trace() as report:
        for x0 in xs:
            x = x0.clone().requires_grad_()
            x.sqrt()[:2].sum().backward()
            plain += int(x.grad.isnan().sum())
    for x0 in xs:
        x = x0.clone().requires_grad_()
        with gw.strong_zeros():
            x.sqrt()[:2].sum().backward()
        strong += int(x.grad.isnan().sum())
    genuine = sum(f.count for f in report.of_kind("nan"))
    assert genuine == strong == 2, report
    assert genuine + sum(f.count for f in report.of_kind("contamination")) == plain, report


_PROGRAMS = {  # a NaN born at x < 0 (sqrt), then what the output keeps of it
    "broadcast": lambda x: (x.sqrt()[:, :1] * torch.ones(1, 5)).sum(),
    "expand": lambda x: x.sqrt()[:1].expand(3, 2).sum(),
    "keepdim": lambda x: x.sqrt().sum(1, keepdim=True)[:2].sum(),
    "unbind": lambda x: x.sqrt().unbind(0)[2].sum(),
    "max": lambda x: x.sqrt().max(1).values[:3].sum(),
    "strided view": lambda x: x.sqrt().view(-1)[::3].sum(),
    "h * h": lambda x: (lambda h: (h * h)[:2].sum())(x.sqrt()),
    "mm": lambda x: (x.sqrt() @ torch.ones(2, 2))[:1].sum(),
    "two slices": lambda x: (lambda h: h[:1].sum() + h[3:].sum())(x.sqrt()),
    "two births": lambda x: x.sqrt()[:1].sum() + x.log()[3:].sum(),
}


@pytest.mark.parametrize("name", list(_PROGRAMS))
@pytest.mark.parametrize("steps", [1, 3])
def test_genuine_count_matches_strong_zeros(name, steps):
    x0 = torch.tensor([[-1.0, 4.0], [4.0, -1.0], [-1.0, -1.0], [4.0, 4.0]])
    with gw.trace() as report:
        for _ in range(steps):
            _PROGRAMS[name](x0.clone().requires_grad_()).backward()
    strong = x0.clone().requires_grad_()
    with gw.strong_zeros():
        _PROGRAMS[name](strong).backward()
    assert sum(f.count for f in report.of_kind("nan")) == steps * int(strong.grad.isnan().sum()), report
    assert all(f.count > 0 for f in report.findings), report


def _euclidean(x1, x2):
    from gradwise._ops._kinks import KINKS, OpCall
    aten = torch.ops.aten
    return KINKS[aten._euclidean_dist].locate(OpCall((x1, x2), {}, aten._euclidean_dist(x1, x2)))


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor an op made (elements)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.most = max(self.most, o.numel())
        return out


def test_cdist_kink_copies_no_row_per_near_pair():
    """known_trace: 300 equal rows of 64 on both sides gathered both rows of each of the 90,000 near pairs (two
    5.8M-element copies; at 2,000 rows of 64 the trace's backward took 23x the plain one, 7.7 s). Reference: the
    largest tensor the fact makes, at most a few times the 90,000 distances."""
    x = torch.zeros(300, 64)
    with _Largest() as largest:
        site = _euclidean(x, x)
    assert bool(site.mask.all())
    assert largest.most <= 4 * 300 * 300, largest.most


_ROWS = {  # x1, x2 (more than 25 rows: the matrix-product route)
    "signed zeros": (torch.zeros(30, 3), -torch.zeros(30, 3)),
    "near, not equal": (torch.ones(30, 3), torch.ones(30, 3) + torch.tensor([0.0, 0.0, 1e-7])),
    "broadcast batch": (torch.arange(90.0).view(1, 30, 3), torch.arange(90.0).view(30, 3).expand(2, 30, 3) * 1),
    "float64 duplicates": (torch.randn(40, 5, dtype=torch.float64).repeat(2, 1),
                           torch.randn(40, 5, dtype=torch.float64).repeat(2, 1)),
    "NaN rows": (torch.full((30, 3), NAN), torch.full((30, 3), NAN)),
}


@pytest.mark.parametrize("name", list(_ROWS))
def test_cdist_kink_only_at_coincident_rows(name):
    x1, x2 = _ROWS[name]
    if name == "float64 duplicates":
        x2[7] = x1[3]
    site = _euclidean(x1, x2)
    b1, b2 = torch.broadcast_tensors(x1[..., :, None, :], x2[..., None, :, :])
    assert torch.equal(site.mask, (b1 == b2).all(-1)), name


def _checkpointed_step(watch):
    torch.manual_seed(0)
    bn, lin, calls = torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3), []

    def block(z):
        calls.append(1)
        return bn(lin(z))

    x = torch.tensor([[4.0, 1.0, 2.0], [1.0, 0.5, 3.0], [2.0, 2.0, 1.0], [-1.0, 1.0, 1.0]], requires_grad=True)
    with gw.watch() if watch else contextlib.nullcontext():
        out = torch.utils.checkpoint.checkpoint(block, x * 1, use_reentrant=False)
        (out[:3].sum() + x.sqrt()[:3].sum()).backward()  # x.grad[3, 0]: NaN (contamination)
    return len(calls), bn.running_mean.clone(), int(bn.num_batches_tracked), x.grad


def test_watch_does_not_recompute_a_checkpointed_forward_again():
    """SILENT in known_trace: the replay recomputed a checkpointed forward a third time (torch.utils.checkpoint
    recomputes per graph task): a BatchNorm in it counted 3 batches instead of 2 and its running mean moved on
    (0.048 where the program without gw.watch() holds 0.034), and the forward's counter ran 3 times."""
    plain, watched = _checkpointed_step(False), _checkpointed_step(True)
    assert plain[3].isnan().any()
    assert watched[0] == plain[0] and watched[2] == plain[2]
    assert torch.equal(watched[1], plain[1])
    assert torch.equal(watched[3].nan_to_num(7.0), plain[3].nan_to_num(7.0))
