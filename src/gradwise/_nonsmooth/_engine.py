"""The driver: one pass of f under ``_KinkMode`` in a dual level (``_run``, ``_lex_passes``),
``directional_derivative``, branch locking (``_locked_grad``, the memo ``_LAST_TIE``), ``generalized_grad``,
``generalized_backward``, ``kinks_hit``.

May import: torch, ``_contexts``, ``_errors``, ``_lazy``, ``_records``, ``_rules``, ``_kink_watch``, ``_kink_mode``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

from gradwise._nonsmooth import _contexts as _ctx
from gradwise._nonsmooth import _lazy
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._kink_mode import _Diverged, _KinkMode, _Stop
from gradwise._nonsmooth._kink_watch import _UNSEEN_KINKY
from gradwise._nonsmooth._records import Kink, NearKink, _Run, _user_line
from gradwise._nonsmooth._rules import _is_dual, _needs_grad

aten = torch.ops.aten
Tensor = torch.Tensor

# Forward AD imports this on first use; it warns about torch.jit.script, which pytest would turn into an error
# (a DeprecationWarning up to torch 2.13, a FutureWarning from 2.14: matched by its text).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated")
    import torch._decomp.decompositions_for_jvp

# ------------------------------------------------------------------------------------------------ driver


def _as_inputs(inputs, what: str = "inputs") -> tuple[tuple[Tensor, ...], bool]:
    single = isinstance(inputs, Tensor)
    xs = (inputs,) if single else inputs
    if not isinstance(xs, (tuple, list)) or not xs:
        raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what}[{i}] is a {type(x).__name__}, not a torch.Tensor; pass tensors "
                            "(e.g. torch.tensor(...))")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{what}[{i}] has dtype {x.dtype}; derivatives need a real floating dtype: "
                            f"convert it with .double() or .float()")
    _ctx.check_input_values(xs, what)
    return tuple(xs), single


def _call(f, duals: tuple[Tensor, ...], single: bool):
    return f(duals[0]) if single else f(*duals)


def _outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
        return list(out)
    raise TypeError(f"f must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _run(f, xs, single, directions, run: _Run, requires_grad: bool, strip_after: int | None = None,
         stop_after: int | None = None, detect: bool = False, expect: list | None = None, lazy: bool = False):
    """One pass of f at xs with tangents ``directions`` (None: a tangent-free detection pass, or no tangent
    for that input). ``detect``: rules also see arguments that only require grad (tangents stripped after
    ``strip_after``). ``expect``: the trail of calls this pass must follow (else `_Diverged`). ``lazy``: tangents
    may be `_lazy.LazyTangent`s (for passes whose tangents only kink rules read). Returns (output,
    [(primal, tangent)] per output, leaves, mode)."""
    # an input whose elements share memory (expanded: stride 0) takes no tangent (make_dual writes one per element)
    leaves = tuple((x.detach().clone() if torch._debug_has_internal_overlap(x) else x.detach())
                   .requires_grad_(requires_grad) for x in xs)
    if requires_grad:  # the inputs' own gradient hooks act on the gradient as in torch.autograd.grad
        for x, leaf in zip(xs, leaves, strict=True):
            for hook in (x._backward_hooks or {}).values():
                leaf.register_hook(hook)
    dual = directions is not None
    if lazy:
        run.dead_from = stop_after if stop_after is not None else strip_after
    with _ctx.pass_context(), _ctx.dual_level(), torch.enable_grad():  # (the mode keeps grad off if not requires_grad)
        args = tuple(x if not dual or d is None else fwAD.make_dual(x, d.to(x.dtype))
                     for x, d in zip(leaves, directions or [None] * len(xs), strict=True))
        if dual:
            run.inputs = tuple((p, t, p._version) for p, t in (fwAD.unpack_dual(a) for a in args) if t is not None)
            if requires_grad:  # (second-order tangents: `_rules._second_order_key`; the duals are views of the
                # leaves, so the inputs' own hooks, which act on f's gradient, do not see those reverse passes)
                run.leaves = (args, tuple(None if d is None else d.to(x.dtype)
                                          for x, d in zip(leaves, directions, strict=True)))
        positions = {id(t): i for ts in (xs, leaves, args) for i, t in enumerate(ts)}
        subs = {id(x): a for x, a in zip(xs, args, strict=True)}
        involved = (lambda a: _needs_grad(a) or _is_dual(a)) if detect else _is_dual if dual else _needs_grad
        mode = _KinkMode(run, subs, positions, involved, strip_after, stop_after, dual, graph=requires_grad)
        mode.expect = expect
        watch = mode.watch = _ctx.opaque_watch(mode, _UNSEEN_KINKY, _user_line)
        _ctx.restore_state()
        try:
            with mode, watch, _lazy.lazy_tangents(lazy):
                out = _call(f, args, single)
        except _Stop:
            watch.check()
            return None, [], leaves, mode
        except NotImplementedError as e:
            watch.check()
            if "out= function" in str(e):  # PyTorch's forward AD refuses out=, even under no_grad
                raise NonsmoothError(f"f (called at {_user_line()}) runs an op with out= on a tensor that carries "
                                     "gradwise's direction (torch.nn.utils spectral_norm's power iteration writes "
                                     "F.normalize(..., out=u) in training mode), which PyTorch's forward-mode AD "
                                     "does not support. Put the module in eval mode for the call (spectral_norm then "
                                     "uses its stored u, v), or compute that op without out=. PyTorch said: "
                                     f"{str(e).splitlines()[0]}") from None
            if "custom autograd.Function" not in str(e):
                raise
            raise NonsmoothError(f"f (called at {_user_line()}) applies a custom autograd.Function that defines no "
                                 "jvp: gradwise cannot follow a direction through it nor see a kink inside its "
                                 "forward. Define its forward-mode derivative (a jvp staticmethod), or write it with "
                                 "torch ops") from None
        except Exception as e:
            if "_fw_primal" not in str(e):  # that refusal below is exact; a hit may be a formula's own compare
                watch.check()
            if "Nested forward mode AD is not supported" in str(e):
                raise NonsmoothError(f"f (called at {_user_line()}) runs forward-mode AD of its own (torch.func.jvp, "
                                     "jacfwd, torch.autograd.forward_ad) while gradwise follows a direction through "
                                     "f with forward-mode AD, and PyTorch does not nest the two. Compute that "
                                     "derivative outside f, or with reverse mode (torch.func.vjp, jacrev) after "
                                     "the last kink") from None
            if "forward gradient that has a different size" in str(e):  # PyTorch's forward AD of an op failed
                raise NonsmoothError(f"f (called at {_user_line()}) runs an op whose forward-mode derivative "
                                     "PyTorch gets wrong (a tangent of the wrong size: torch._foreach_norm's, for "
                                     "one), which gradwise needs to follow a direction. Write that part with "
                                     "single-tensor ops (torch.linalg.vector_norm per tensor). PyTorch said: "
                                     f"{str(e).splitlines()[0]}") from None
            if "_fw_primal" in str(e):  # forward AD's Python decompositions called from TorchScript reach the mode
                raise NonsmoothError(f"f (called at {_user_line()}) runs code that gradwise cannot follow with "
                                     "tangents (TorchScript from torch.jit.script/trace, whose forward-mode "
                                     "formulas call back into Python). Call the Python function (the module before "
                                     "scripting/tracing) instead") from None
            raise
        watch.check(_outputs(out))
        primals = [fwAD.unpack_dual(o) for o in _outputs(out)]
    return out, primals, leaves, mode


def _extra_directions(xs, gen: torch.Generator, n: int):
    return [tuple(torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype) for x in xs)
            for _ in range(n)]


MAX_EXTRA_PASSES = 3


def _lex_passes(f, xs, single, first, gen, requires_grad, run_kw=None, strip_after=None, expect=None):
    """Run f along ``first``; while comparison ties stay unresolved, add random directions and rerun.

    Returns the final run (its branches ranked by all directions) and its `_run` result. ``expect``: the trail
    the passes along ``first`` must follow (`_Diverged` otherwise).
    """
    run_kw = run_kw or {}
    run = _Run(**run_kw)
    result = _run(f, xs, single, first, run, requires_grad, strip_after, expect=expect)
    history = run.kinks
    for extra in _extra_directions(xs, gen, MAX_EXTRA_PASSES) if _unresolved(run) else []:
        nxt = _Run(history=history, **run_kw)
        _run(f, xs, single, extra, nxt, False)
        history = nxt.kinks
        if not _unresolved(nxt):
            break
    if history is not run.kinks:  # rerun along the first direction with every ranking column known
        run = _Run(history=history, **run_kw)
        result = _run(f, xs, single, first, run, requires_grad, strip_after, expect=expect)
    return run, result


def _unresolved(run: _Run) -> bool:
    return any(k.unresolved and k.comparison for k in run.kinks)


def _as_direction(d, x: Tensor):
    """A nested sequence of numbers shaped like x becomes a tensor of x's dtype; anything else is left as is."""
    if isinstance(d, Tensor) or not isinstance(d, (tuple, list, int, float)):
        return d
    try:
        t = torch.as_tensor(d, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        return d
    return t if t.shape == x.shape else d


def _check_directions(xs, directions, single):
    if single and not isinstance(directions, Tensor):
        whole = _as_direction(directions, xs[0])
        directions = whole if isinstance(whole, Tensor) else directions
    ds = (directions,) if isinstance(directions, Tensor) and single else directions
    if isinstance(ds, Tensor):
        ds = (ds,)
    if not isinstance(ds, (tuple, list)) or len(ds) != len(xs):
        raise TypeError(f"directions must match inputs: {len(xs)} tensor(s) shaped like the inputs")
    ds = tuple(_as_direction(d, x) for d, x in zip(ds, xs, strict=True))
    ds = tuple(d.clone() if isinstance(d, Tensor) and d.is_inference() else d for d in ds)  # (no tangent otherwise)
    for i, (x, d) in enumerate(zip(xs, ds, strict=True)):
        if not isinstance(d, Tensor) or d.shape != x.shape:
            raise TypeError(f"directions[{i}] must be a tensor of shape {tuple(x.shape)}, got "
                            f"{getattr(d, 'shape', type(d).__name__)}")
        if not d.is_floating_point():
            raise TypeError(f"directions[{i}] has dtype {d.dtype}; use a floating dtype")
    _ctx.check_input_values(ds, "directions")
    return tuple(ds)


@_ctx.same_state
def directional_derivative(f: Callable, inputs: Tensor | tuple[Tensor, ...],
                           directions: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """The exact one-sided directional derivative f'(x; d) = lim_{t->0+} (f(x + t d) - f(x)) / t.

    ``f`` is called as ``f(*inputs)`` (or ``f(inputs)`` for one tensor); ``directions`` is shaped like
    ``inputs``; the result is shaped like f's output. Kink ops use their one-sided rules (see
    ``docs/nonsmooth.md``); where tangents tie too, further directions decide (lexicographic derivatives).

    >>> import torch, gradwise as gw
    >>> x = torch.tensor(0.0)
    >>> gw.directional_derivative(lambda x: torch.relu(x) - torch.relu(-x), x, torch.tensor(-2.0))
    tensor(-2.)
    >>> gw.directional_derivative(torch.abs, x, torch.tensor(-1.0))
    tensor(1.)
    """
    xs, single = _as_inputs(inputs)
    ds = _check_directions(xs, directions, single)
    gen = torch.Generator().manual_seed(0)
    run, (out, primals, _, _) = _lex_passes(f, xs, single, ds, gen, False, {"ray": True})
    if run.needs_second:  # a comparison's argument has tangent 0: its second-order tangent needs a graph
        k = next((k for k in run.kinks if k.second_order), None)
        try:
            run, (out, primals, _, _) = _lex_passes(f, xs, single, ds, torch.Generator().manual_seed(0), True,
                                                    {"ray": True})
        except RuntimeError as e:  # (autograd refuses f's in-place writes into inputs that require grad)
            if "in-place" not in str(e):
                raise
            raise NonsmoothError(f"{k.op if k else 'a comparison'} at {k.location if k else _user_line()}: its "
                                 "argument has tangent 0 along the direction, and which side of its jump it goes "
                                 "to is read from autograd's graph of f, which f cannot build: it writes in place "
                                 f"into its inputs ({str(e).splitlines()[0]}). Clone them inside f first") from None
        primals = [(p.detach(), None if t is None else t.detach()) for p, t in primals]
    _check_no_jump(f, xs, single, run, [p for p, _ in primals], exact=True)
    tangents = [torch.zeros_like(p) if t is None else t for p, t in primals]
    return tangents[0] if isinstance(out, Tensor) else tuple(tangents)


def _check_no_jump(f, xs, single, run: _Run, values: list[Tensor], exact: bool = False) -> None:
    """Comparisons and piecewise-constant ops at a jump take the branch (limit) of the direction: if f's value
    then differs from f(x), f jumps at x along it and has no one-sided derivative (nor a Clarke gradient)."""
    jumps = [k for k in run.kinks if k.comparison or k.indices_read]
    if not jumps:
        return
    _ctx.restore_state()
    # (checkpoints plainly: no reentrant "requires_grad" warning); f that runs a reverse pass through its inputs
    # (a gradient penalty) needs inputs that require grad, as a plain call of f does
    with _ctx.pass_context(), torch.set_grad_enabled(run.reverses):
        plain = _outputs(_call(f, tuple(x.detach().requires_grad_(run.reverses and x.is_floating_point())
                                        for x in xs), single))
    for p, q in zip(values, plain, strict=True):
        p, q = p.detach().nan_to_num(), q.detach().nan_to_num()
        tol = 0.0 if exact else 100 * torch.finfo(q.dtype).eps if q.is_floating_point() else 0.0
        if not torch.allclose(p, q, rtol=tol, atol=tol):
            k = next((k for k in jumps if k.second_order), jumps[0])
            how = (" (its argument's tangent is 0 there; its higher-order, second-order tangent moves it across)"
                   if k.second_order else "")
            raise NonsmoothError(f"f jumps at x along this direction ({k.op} at {k.location} takes another branch"
                                 f"{how} and f's value changes): there is no one-sided derivative, and no Clarke "
                                 "generalized gradient")


def _random_direction(xs, seed: int | None, only: set[int] | None = None):
    """A Gaussian direction (None for inputs outside ``only``) and the generator, for further directions.
    Every input's part is drawn, so ``only`` does not change the others'."""
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ())))  # (a NumPy int too)
    dtype = lambda x: x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    d = tuple(torch.randn(x.shape, generator=gen, dtype=dtype(x)).to(x.device) for x in xs)
    return tuple(v if only is None or i in only else None for i, v in enumerate(d)), gen


def _scalar(primals: list) -> Tensor:
    """f's one scalar output (``primals``: the pass's (primal, tangent) per output)."""
    if len(primals) != 1:  # (torch.autograd.grad would sum them: gradwise asks the caller to say so)
        raise ValueError(f"f must return one scalar for a generalized gradient, got a tuple of {len(primals)} "
                         "tensors; return their sum (or the one you mean), or use gw.directional_derivative")
    primal = primals[0][0]
    if primal.numel() != 1:
        raise ValueError(f"f must return a scalar for a generalized gradient, got shape {tuple(primal.shape)}; "
                         "reduce it (e.g. .sum() or .mean()) or use gw.directional_derivative")
    return primal.reshape(())


def _grad_or_zero(y: Tensor, leaves, retain_graph: bool | None = None) -> tuple[Tensor | None, ...]:
    """autograd.grad, where a y that no graph reaches (f constant on this piece: argmax one-hot, a literal) has
    zero gradients (None: unused) rather than PyTorch's 'does not require grad'."""
    if not y.requires_grad:
        return (None,) * len(leaves)
    return torch.autograd.grad(y, leaves, retain_graph=retain_graph, allow_unused=True)


def _grads(y: Tensor, leaves, xs) -> tuple[Tensor, ...]:
    """The gradients w.r.t. the pass's leaves. f's value may also reach the inputs themselves, through a tensor
    made from them outside f (an encoder's output computed once): gradwise saw none of the ops on that path, so
    it refuses rather than drop (or take PyTorch's convention for) that part of the gradient."""
    outside = [i for i, x in enumerate(xs) if x.requires_grad]
    grads = _grad_or_zero(y, [*leaves, *(xs[i] for i in outside)])
    reached = [i for i, g in zip(outside, grads[len(leaves):], strict=True) if g is not None]
    if reached:
        raise NonsmoothError(f"f's value depends on input {reached[0]} through a tensor computed from it outside f "
                             "(e.g. features computed once before the call): gradwise cannot see the ops that made "
                             "it, and would drop that part of the gradient. Compute that tensor inside f")
    return tuple(grads[:len(leaves)])  # (None for an input f does not use)


# f's code object -> the mode call of its last tie at the previous call (-1: none, or none a saved index can lock).
# A training loop calls generalized_grad on the same code again and again: when it tied last time, the first pass
# carries tangents up to that call and ranks the ties itself, saving the second pass.
_LAST_TIE: OrderedDict[object, int] = OrderedDict()
_LAST_TIE_SIZE = 256


def _locked_grad(f, xs, single, seed, run_kw=None, direction=None, memo=None, unused_none=False):
    """`_raw_locked_grad`, with zeros for the inputs f does not use (``unused_none``: None instead, as
    ``.backward()`` leaves their ``.grad``). ``memo``: the key of f's last tie (`_LAST_TIE`), by default f's code."""
    grads, probe, value = _raw_locked_grad(f, xs, single, seed, run_kw, direction,
                                            memo if memo is not None else getattr(f, "__code__", None))
    if not unused_none:
        grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True))
    return grads, probe, value


def _raw_locked_grad(f, xs, single, seed, run_kw, direction, memo):
    """A generalized gradient. A tangent-free pass finds the kinks, building the graph with provisional
    branches; without ties that graph is the answer. With ties, f runs again along a random direction, stopping
    after the last tie; the branches it ranks are written into the first pass's lock tensors (saved indices and
    masks), then one reverse pass. If f's previous call tied, the first pass carries the direction's tangents up
    to where its last tie was, ranking those ties itself. Comparisons and norms at 0 (whose branch changes more
    than a saved index) take a full pass along the direction instead. The direction is drawn from ``seed`` over
    every input, so the result does not depend on which pass ranks; ``direction`` replaces it (the further
    directions that break remaining ties are still drawn from ``seed``).
    """
    draw = _random_direction if direction is None else _given(direction)
    run_kw = {**(run_kw or {}), "top_only": True}  # only the gradient leaves: rules may rank what ops return
    carry = _LAST_TIE.get(memo, -1) if memo is not None else -1
    d, gen = draw(xs, seed) if carry >= 0 else (None, None)  # drawn only when needed
    probe = _Run(**run_kw)
    try:  # (its tangents are read only by the ties up to call ``carry``: lazy ones)
        _, primals, leaves, mode = _run(f, xs, single, d, probe, True, strip_after=carry if d else None, detect=True,
                                        lazy=d is not None)
    except _lazy.Stale:  # f wrote into a tensor a lazy tangent reads before computing it: eager tangents
        probe = _Run(**run_kw)
        _, primals, leaves, mode = _run(f, xs, single, d, probe, True, strip_after=carry if d else None, detect=True)
    y = _scalar(primals)
    lockable = all(k.write is not None for k in probe.kinks)
    if memo is not None:
        _LAST_TIE[memo] = mode.last_tie if probe.kinks and lockable else -1
        _LAST_TIE.move_to_end(memo)
        if len(_LAST_TIE) > _LAST_TIE_SIZE:
            _LAST_TIE.popitem(last=False)
    if probe.kinks and d is None:
        d, gen = draw(xs, seed)
    if probe.kinks and not lockable:
        # a comparison's side (or an index f read) may change what later ops see: a kink that only that side hits
        # (relu on x[x0 > 0] at 0) comes after the probe's last tie and needs its tangent, so none is dropped
        moves = any(k.comparison or k.indices_read for k in probe.kinks)
        return _full_pass_grad(f, xs, single, d, gen, run_kw, mode.used_at_tie, None if moves else mode.last_tie,
                               mode.trail)
    if not all(k.tangent for k in probe.kinks):
        ranked, known = _Run(**run_kw), {}
        for k in probe.kinks:
            known.setdefault(k.call[0], []).append(k)
        ranked.known = known
        dr = tuple(v if i in mode.used_at_tie else None for i, v in enumerate(d))
        graph = mode.reverses  # a reverse pass inside f (a gradient penalty) needs a graph to run on
        try:
            try:  # (stopped after the last tie: lazy tangents, as in the first pass)
                _run(f, xs, single, dr, ranked, graph, stop_after=mode.last_tie, expect=mode.trail, lazy=True)
            except _lazy.Stale:
                ranked = _Run(**run_kw)
                ranked.known = known
                _run(f, xs, single, dr, ranked, graph, stop_after=mode.last_tie, expect=mode.trail)
        except _Diverged:  # f took another path without gradients (hooks, checkpoints ...): one full pass
            return _full_pass_grad(f, xs, single, d, gen, run_kw, mode.used_at_tie, None)
        choices = {k.call: k for k in ranked.kinks}
        if any(k.call not in choices or choices[k.call].op != k.op or not torch.equal(choices[k.call].cand, k.cand)
               for k in probe.kinks):
            return _full_pass_grad(f, xs, single, d, gen, run_kw, mode.used_at_tie, None)
        for k in probe.kinks:
            k.write(choices[k.call].choice)
            k.choice = choices[k.call].choice
    _ctx.check_functions(y, _user_line())
    return _grads(y, leaves, xs), probe, y.detach()


def _given(direction):
    """A direction drawer that returns ``direction`` (and ``seed``'s generator, for further directions)."""

    def draw(xs, seed):
        return tuple(v.to(x.dtype) for v, x in zip(direction, xs, strict=True)), _random_direction(xs, seed)[1]

    return draw


def _full_pass_grad(f, xs, single, d, gen, run_kw, used: set[int], strip_after: int | None, trail=None):
    """A generalized gradient from one pass along ``d`` (restricted to the ``used`` inputs) that ranks every tie as
    it goes and keeps its own graph: for kinks whose lock is more than a saved index (comparisons, norms at 0), and
    for f whose passes take different paths with and without gradients. Tangents are dropped after call
    ``strip_after`` (the tangent-free pass's last tie) only while this pass follows that one's ``trail``: code
    that runs with tangents only (a custom Function's jvp) shifts the count, and a tie would lose its tangent."""
    d = tuple(v if i in used else None for i, v in enumerate(d))
    try:
        probe, (_, primals, leaves, _) = _lex_passes(f, xs, single, d, gen, True, run_kw, strip_after=strip_after,
                                                     expect=trail if strip_after is not None else None)
    except _Diverged:
        probe, (_, primals, leaves, _) = _lex_passes(f, xs, single, d, gen, True, run_kw)
    y = _scalar(primals)
    _check_no_jump(f, xs, single, probe, [y])
    if any(k.comparison or k.indices_read for k in probe.kinks):  # and along -d: one jumping side is enough
        back = _Run(**run_kw)
        _, opposite, _, _ = _run(f, xs, single, tuple(None if v is None else -v for v in d), back, probe.reverses)
        _check_no_jump(f, xs, single, back, [p for p, _ in opposite])
    _ctx.check_functions(y, _user_line())
    return _grads(y, leaves, xs), probe, y.detach()


@_ctx.same_state
def generalized_grad(f: Callable, inputs: Tensor | tuple[Tensor, ...], *,
                     seed: int | None = None) -> tuple[Tensor, ...]:
    """An element of the Clarke subdifferential of scalar ``f`` at ``inputs`` (a tuple, like autograd.grad).

    Every kink is locked to the branch active along a random direction (``seed`` makes it reproducible),
    then one reverse pass runs through the locked branches: the result is the gradient of a smooth piece of f
    active at x. Where no kink is hit it equals ``torch.autograd.grad``. ``inputs`` may be tensors that f
    closes over (e.g. a module's parameters): they are swapped in wherever f uses them.

    >>> import torch, gradwise as gw
    >>> x = torch.tensor(0.0, requires_grad=True)
    >>> gw.generalized_grad(lambda x: torch.relu(x) - torch.relu(-x), x)
    (tensor(1.),)
    """
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    seed = None if seed is None else int(seed)  # a NumPy integer too
    xs, single = _as_inputs(inputs)
    return _locked_grad(f, xs, single, seed)[0]


@_ctx.same_state
def generalized_backward(f: Callable, inputs, *, seed: int | None = None) -> Tensor:
    """Like ``f(...).backward()`` with generalized gradients: accumulates into the ``.grad`` of each input that
    requires grad (a frozen one is a constant of f, as in ``.backward()``).

    ``inputs`` are the tensors to differentiate (e.g. ``list(model.parameters())``); f is called as in
    `generalized_grad` (``f(*inputs)``) and may ignore its arguments and use a module directly. Returns f's
    value.

    >>> import torch, gradwise as gw
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.ReLU())
    >>> loss = gw.generalized_backward(lambda *p: model(torch.ones(1, 2)).sum(), list(model.parameters()))
    >>> model[0].weight.grad.shape
    torch.Size([1, 2])
    """
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    seed = None if seed is None else int(seed)  # a NumPy integer too
    xs, single = _as_inputs(tuple(inputs) if not isinstance(inputs, Tensor) else inputs)
    # as .backward(): a frozen tensor is a constant of f (no tangent, so it breaks no tie) and gets no .grad (an
    # optimizer would move it), nor does one f does not use
    active = [i for i, x in enumerate(xs) if x.requires_grad]
    if len(active) < len(xs):
        call, memo = _with_constants(f, xs, single, active), getattr(f, "__code__", None)
        if not active:
            _ctx.restore_state()
            with torch.no_grad():
                return _scalar([(o, None) for o in _outputs(call())]).detach()
        grads, _, value = _locked_grad(call, tuple(xs[i] for i in active), False, seed, memo=memo,
                                       unused_none=True)
        xs = tuple(xs[i] for i in active)
    else:
        grads, _, value = _locked_grad(f, xs, single, seed, unused_none=True)
    for x, g in zip(xs, grads, strict=True):
        if g is None:
            continue
        x.grad = g.detach().clone() if x.grad is None else x.grad + g
        for hook in (getattr(x, "_post_accumulate_grad_hooks", None) or {}).values():  # as .backward() runs them
            hook(x)
    return value


def _with_constants(f: Callable, xs: tuple, single: bool, active: list[int]) -> Callable:
    """f of the ``active`` inputs alone, the others passed as they are (constants)."""
    def call(*moving):
        args = list(xs)
        for i, t in zip(active, moving, strict=True):
            args[i] = t
        return f(args[0]) if single else f(*args)

    return call


@_ctx.same_state
def kinks_hit(f: Callable, inputs, *, seed: int | None = 0, tie_tol: float = 0.0,
              near_tol: float | None = None, tangents: bool = True) -> tuple[list[Kink], list[NearKink]]:
    """The kinks f hits at ``inputs`` and the near-ties within near_tol. With ``tangents`` (one run along a
    random direction) only kinks that depend on the inputs count; without, any tie on a tensor that requires
    grad does (for f with custom autograd Functions lacking a ``jvp``)."""
    _ctx.check_int("seed", seed, low=0, high=2**63 - 1, allow_none=True)
    seed = None if seed is None else int(seed)  # a NumPy integer too
    _ctx.check_real("tie_tol", tie_tol, low=0.0)
    _ctx.check_real("near_tol", near_tol, low=0.0, allow_none=True)
    xs, single = _as_inputs(inputs)
    if not tangents:
        run = _Run(tie_tol=tie_tol, near_tol=near_tol)
        _run(f, xs, single, None, run, True)
        return run.kinks, run.near
    run = _probe(f, xs, single, _random_direction(xs, seed)[0], tie_tol=tie_tol, near_tol=near_tol)[0]
    return run.kinks, run.near


def kinks_and_opaque(f: Callable, inputs) -> tuple[list[Kink], bool]:
    """The kinks f hits at ``inputs`` (tangent-free: any tie on a tensor that requires grad), and whether the pass
    ran code whose derivatives are not gradwise's: a custom autograd.Function in f's graph, a custom op, an op
    outside every call gradwise sees (TorchScript, an extension). Only there can a kink hide from it."""
    xs, single = _as_inputs(inputs)
    run = _Run()
    out, _, _, mode = _run(f, xs, single, None, run, True)
    return run.kinks, mode.watch.opaque or bool(_ctx.custom_functions(_outputs(out)))


def _probe(f, xs, single, d, **run_kw) -> tuple[_Run, _KinkMode]:
    """One pass along ``d`` that records the kinks (no gradient wanted): where a comparison's argument has tangent 0
    it runs again with a graph, so that the tie takes the side of its s'' as in directional_derivative (which kinks
    follow depends on it: a mask from that comparison selects what later ops see)."""
    run = _Run(**run_kw)
    mode = _run(f, xs, single, d, run, False)[3]
    if run.needs_second:
        again = _Run(**run_kw)
        try:
            mode, run = _run(f, xs, single, d, again, True)[3], again
        except RuntimeError as e:  # (f writes in place into its inputs: autograd refuses; the callers that need
            if "in-place" not in str(e):  # a graph raise about it themselves)
                raise
    return run, mode
