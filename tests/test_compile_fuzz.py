"""The compiled-graph pass (``_compile_pass.rewrite_backward``) against eager strong zeros on random programs (#12).

Each program (``_compile_programs.program``: gates, where/masked_fill, slices and placements, pad, flips, rolls,
reductions, matmuls, softmax, layer norm, conv2d + pooling, attention) runs over data holding NaN/Inf, some
discarded and some used. Its backward graph is made as inductor makes it (inductor's decompositions and joint-graph
passes, its partitioner: ``torch._inductor.compile_fx.partition_fn``), rewritten by the pass and run op by op,
without a compiler (about 0.4 s a program). Per gradient:

- the compiled strong variant's result is taken as it is whenever all of its gradients are finite
  (``_compile._hybrid``), so then each must equal eager ``gw.grad`` (never a different finite number, never a
  genuine NaN/Inf of eager made finite); where some gradient holds NaN/Inf the node runs op by op and nothing is
  checked here (``test_compiled_programs`` runs a few end to end);
- on finite data the rewritten graph is the plain one, bit for bit.

A handful of seeds run in CI; ``-m slow`` runs many more. A failing seed prints its program.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from _compile_programs import program
from gradwise._strong_zeros import _compile_pass

with warnings.catch_warnings():  # inductor's first import warns from torch.jit (torch's own deprecation)
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._inductor.compile_fx as compile_fx
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._inductor.decomposition import select_decomp_table

NAN, INF = float("nan"), float("inf")


def _pass_runner(f):
    """f compiled with inductor's graph preparation and a backward that runs the pass's graph op by op; returns
    grads(x, w, v, rewrite) (``rewrite=False``: the same backward graph without the pass)."""
    state = {"rewrite": True}

    def backward_compiler(gm, example_inputs):
        plain = copy.deepcopy(gm)
        _compile_pass.rewrite_backward(gm.graph)
        gm.recompile()
        return make_boxed_func(lambda *args: (gm if state["rewrite"] else plain)(*args))

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=backward_compiler,
                           decompositions=select_decomp_table(), partition_fn=compile_fx.partition_fn)
    compiled = torch.compile(f, backend=backend)

    def grads(x, w, v, rewrite=True):
        state["rewrite"] = rewrite
        leaves = [t.clone().requires_grad_(True) for t in (x, w, v)]
        return torch.autograd.grad(compiled(*leaves), leaves, allow_unused=True, materialize_grads=True)

    return grads


def _eager(f, x, w, v):
    leaves = [t.clone().requires_grad_(True) for t in (x, w, v)]
    return gw.grad(f(*leaves), leaves, allow_unused=True, materialize_grads=True)


def disagreements(seed: int) -> list[str]:
    """What the pass's compiled strong variant gets wrong against eager strong zeros (empty: nothing)."""
    text, f, x, w, v = program(seed)
    got = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _eager(f, x, w, v)
        passed = _pass_runner(f)(x, w, v)
        if all(bool(p.isfinite().all()) for p in passed):  # taken as it is (else: op by op)
            for name, p, e in zip("xwv", passed, want, strict=True):
                wrong = e.isfinite() & ~torch.isclose(p, e, rtol=1e-4, atol=1e-5)
                if wrong.any():
                    got.append(f"d{name}: the pass {p[wrong].tolist()}, eager {e[wrong].tolist()}")
                hidden = ~e.isfinite()
                if hidden.any():
                    got.append(f"d{name}: the pass made eager's genuine {e[hidden].tolist()} finite")
        _, ff, xf, wf, vf = program(seed, finite=True)
        grads = _pass_runner(ff)
        for name, p, q in zip("xwv", grads(xf, wf, vf), grads(xf, wf, vf, rewrite=False), strict=True):
            fin = q.isfinite()  # (log, sqrt and division can still make NaN/Inf of finite data)
            if not torch.equal(p[fin], q[fin]):
                got.append(f"finite data, d{name}: not bitwise PyTorch's ({p.tolist()} vs {q.tolist()})")
    if got:
        got.append(f"program (seed {seed}):\n  {text}")
    return got


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 6, 8, 96])
def test_pass_agrees_with_eager_strong_zeros(seed):
    assert not disagreements(seed), "\n".join(disagreements(seed))


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
def test_pass_agrees_with_eager_strong_zeros_many(block):
    failed = {s: d for s in range(1000 + 50 * block, 1050 + 50 * block) if (d := disagreements(s))}
    assert not failed, "\n\n".join("\n".join(d) for d in list(failed.values())[:3])


# -- found by the fuzzer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["hardsigmoid", "clamp", "hardswish"])
def test_a_gate_at_a_nan_keeps_the_genuine_nan(gate):
    """w * x + x with x = inf, w = -1 is NaN, and hardsigmoid(NaN) = NaN is used. Its backward (inductor's
    decomposition ``where((x > -3) & (x < 3), g / 6, 0)``, clamp's own formula ``where((x >= lo) & (x <= hi), g,
    0)``) compares the NaN: False, yet the NaN is in no flat region, so that 0 is no structural zero and dw =
    0 x inf stays NaN as in plain PyTorch. The pass (hardsigmoid) and eager strong zeros (clamp) took it for one
    and returned a finite 0."""
    fn = {"hardsigmoid": F.hardsigmoid, "clamp": lambda h: h.clamp(-1, 1), "hardswish": F.hardswish}[gate]
    x, w, v = torch.tensor([[INF, 0.5, 2.0]]), torch.tensor([[-1.0, 1.0, 1.0]]), torch.ones(3, 3)

    def f(x, w, v):
        return fn(w * x + x).sum()

    leaves = [t.clone().requires_grad_(True) for t in (x, w, v)]
    plain = torch.autograd.grad(f(*leaves), leaves, allow_unused=True, materialize_grads=True)[1]
    assert not plain[0, 0].isfinite()
    for got in (_eager(f, x, w, v)[1], _pass_runner(f)(x, w, v)[1]):
        torch.testing.assert_close(got, plain, equal_nan=True)


def test_a_users_where_on_a_nan_still_discards_it():
    """The control: a user's ``where(x > 0, sqrt(x), 0)`` at x = NaN did select the 0 in the forward (its
    comparison, recomputed in the backward, is tagged ``is_forward``): the NaN is discarded in every engine."""
    x, w, v = torch.tensor([[NAN, 4.0, -1.0]]), torch.ones(1, 3), torch.ones(3, 3)

    def f(x, w, v):
        h = w * x
        return torch.where(h > 0, h.sqrt(), 0.0).sum()

    want = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(_eager(f, x, w, v)[1], want)
    torch.testing.assert_close(_pass_runner(f)(x, w, v)[1], want)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_gate_at_a_nan_compiled_end_to_end(backend):
    """The same through torch.compile under gw.strong_zeros(): the genuine NaN of hardsigmoid(NaN) stays (inductor's
    strong variant returned a finite 0, taken as it was), with the warning that a compiled NaN may be genuine."""
    x, w = torch.tensor([[INF, 0.5, 2.0]]), torch.tensor([[-1.0, 1.0, 1.0]])

    def f(x, w):
        return F.hardsigmoid(w * x + x).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend)
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        wl = w.clone().requires_grad_(True)
        plain = torch.autograd.grad(compiled(x, wl), wl)[0]
        wl = w.clone().requires_grad_(True)
        with gw.strong_zeros(), warnings.catch_warnings():
            warnings.simplefilter("ignore", gw.CompiledBackwardWarning)
            compiled(x, wl).backward()
    assert plain[0, 0].isnan()
    torch.testing.assert_close(wl.grad, plain, equal_nan=True)
