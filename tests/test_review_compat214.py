"""Breaks found reviewing compat214 (torch 2.14 compatibility), each a test that failed on that branch."""

import functools
import subprocess
import sys
import textwrap

import pytest
import torch

import gradwise as gw


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (import-time behaviour), gradwise from this checkout."""
    return subprocess.run([sys.executable, "-W", "error", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={"PYTHONPATH": gw.__file__.rsplit("/gradwise/", 1)[0]}, timeout=240)


def test_the_quantile_probe_ignores_the_importers_default_dtype():
    """The quantile port's rank probe made its tensors in the default dtype: imported after
    ``set_default_dtype(float64)`` it compared double with double, and on torch 2.14 the port then computed float32
    ranks in float32, unlike PyTorch (SILENT: 'higher' picked the next order statistic, off by 1.0)."""
    done = _run("""
        import torch
        torch.set_default_dtype(torch.float64)
        from gradwise._nonsmooth._ports import PORTS
        x = torch.tensor([[-2.0, -1.0, 0.0, 2.0], [0.5, -1.5, 3.0, 1.0]], dtype=torch.float32)
        q = torch.tensor([0.7, 0.9, 0.45, 0.55, 1 / 3], dtype=torch.float32)
        for native in (torch.quantile, torch.nanquantile):
            for interpolation in ("linear", "higher", "midpoint"):
                want = native(x, q, 1, interpolation=interpolation)
                assert torch.equal(PORTS[native](x, q, 1, interpolation=interpolation), want), interpolation
    """)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("context", ["torch.device('meta')", "FakeTensorMode()"])
def test_gradwise_imports_under_a_mode(context):
    """The probe ran at import under whatever mode the importer had on (a model built on the meta device that
    imports gradwise lazily): ``aten::equal`` on meta/fake tensors, and the import crashed."""
    done = _run(f"""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        with {context}:
            import gradwise
    """)
    assert done.returncode == 0, done.stderr


class _Times:
    """A callable object: ``forward = staticmethod(_Times(2))`` runs its body in ``__call__``'s frame."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, ctx, x):
        return self.k * x


def _function(forward):
    return type("F", (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(lambda ctx, g: 2 * g),
                                                   "jvp": staticmethod(lambda ctx, t: 2 * t)})


@pytest.mark.parametrize("forward", [functools.partial(lambda k, ctx, x: k * x, 2), _Times(2)],
                         ids=["partial", "callable object"])
def test_a_custom_forward_without_code_of_its_own_proves_nothing(forward):
    """On torch 2.14 only a forward's own frame marks it, and the set of forward codes read ``__code__`` and
    ``__wrapped__``: a forward that is a ``functools.partial`` or an object with ``__call__`` had neither, its ops
    were taken for constants, and Double(x) - 2x + relu(x) (minimum 0 at 0) got a positive bound (SILENT)."""
    from gradwise._nonsmooth._bound import lower_bound

    double = _function(forward)
    f = lambda x: (double.apply(x) - 2 * x + torch.relu(x)).sum()
    x = torch.zeros(40, dtype=torch.float64)
    assert lower_bound(f, (x,), True, (torch.ones(40, dtype=torch.float64),)) is None


class _NoGradForward(torch.autograd.Function):
    """A Function whose forward is behind ``torch.no_grad()``: that decorator's wrapper code is shared by every
    no_grad-decorated function, f's own helpers included."""

    @staticmethod
    @torch.no_grad()
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@torch.no_grad()
def _scale(x):
    return x.abs().max() + 1


def test_a_no_grad_helper_stays_a_constant_where_apply_marks_forwards():
    """Up to torch 2.13 ``Function.apply``'s frame marks every custom forward; compat214 also matched the forward
    codes there, with their wrappers, so once any Function had a ``@torch.no_grad()`` forward, f's own
    no_grad-decorated helper (a constant in every pass) was taken for a custom forward and the bound refused:
    x + 0.5|x| at 0 has least norm 0.5 sqrt(40), as without the unrelated Function. On torch 2.14 (no apply frame)
    the same refusal was left (a strict xfail): a wrapper's code (torch.no_grad()'s decorate_context) now marks a
    forward only in a frame that holds the forward it wraps (misc36)."""
    from gradwise._nonsmooth._bound import lower_bound

    x = torch.zeros(40, dtype=torch.float64)
    f = lambda x: (x + 0.5 * x.abs()).sum() + _scale(x)
    assert lower_bound(f, (x,), True, (torch.ones(40, dtype=torch.float64),)) == pytest.approx(0.5 * 40**0.5)
