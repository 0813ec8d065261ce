"""The watch: a callable without a route runs once under ``_KinkWatch`` (a TorchDispatchMode) that tests each
kink op it reaches against ``gradwise._ops._kinks``;
``_SMOOTH_CALLS`` (callables seen smooth), ``_unguarded`` composites.

May import: torch, gradwise._modes, ``_errors``, ``_records``, ``_rules``, ``gradwise._ops``.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_leaves, tree_map

from gradwise._modes import LeanDispatchMode
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import _user_line
from gradwise._nonsmooth._rules import _is_dual, _split, _stepped
from gradwise._ops._cuts import onto_axis, same_axis
from gradwise._ops._kinks import KINKS, OpCall, at_kink

Tensor = torch.Tensor


# -- the kink tests, read from the shared op facts (gradwise._ops._kinks) -------------------------------------


def _sits_at_kink(fact, name: str) -> Callable:
    """The test ``(args, kwargs, out) -> bool`` of one aten op: whether that call sits at its kink somewhere, or
    where PyTorch's derivative formula is off (``fact.formula_off``: a rule corrects it, unseen code cannot)."""
    off = fact.formula_off
    if off is None:
        return lambda args, kwargs, out: at_kink(fact, OpCall(args, kwargs, out, name))
    return lambda args, kwargs, out: at_kink(fact, c := OpCall(args, kwargs, out, name)) or off(c)


# In code the mode cannot see (TorchScript) every kink op counts, guards too (comparisons, amax/amin: nothing routes
# them); in callables the mode sees but cannot route, guards do not (PyTorch's own code uses them away from kinks).
_UNSEEN_KINKY = {op.__name__: _sits_at_kink(fact, op.__name__) for op, fact in KINKS.items()}
_KINKY_BY_NAME = {op.__name__: _UNSEEN_KINKY[op.__name__] for op, fact in KINKS.items() if not fact.guard}
# jumps located on their first argument's own elements: with tangents, only where those move
_JUMPS = {op.__name__: fact for op, fact in KINKS.items() if fact.kind == "jump" and not fact.coarse}
# ops whose kink depends on a non-tensor argument or a dtype (pow's exponent, div's rounding mode, a copy's
# destination): a call that cannot kink is no kink op
_POSSIBLE = {op.__name__: fact.possible for op, fact in KINKS.items() if fact.possible is not None}
_READS_NUMBERS = frozenset(op.__name__ for op, fact in KINKS.items() if fact.reads_numbers)


# ------------------------------------------------------------------------------------------------ the watch
# A callable without a route (torch.quantile, torch.linalg.eigvalsh, F.lp_pool1d, torch.ops.aten.relu ...) runs as
# PyTorch runs it, so a kink inside it would get PyTorch's convention. In the pass that finds the kinks, such a
# call runs once under `_KinkWatch`, which sees the aten ops it reaches and tests each kink op whose input depends
# on f's inputs (requires grad) for sitting at its kink: there gradwise raises instead of answering. A callable
# that reaches no kink op at all is remembered as smooth and runs unwatched from then on.

# Callables seen to reach no kink op: they run unwatched.
_SMOOTH_CALLS: set[object] = set()
# Callables seen to reach only ops that cannot kink for the arguments they got (true division, a float copy_):
# callable -> (whether the key holds numbers' values, {`_signature` of such a call}), at most _SIGNATURES each.
# Remembering the callable alone would miss the same callable with a rounding mode or an integer destination;
# remembering nothing would watch every later call (every x / 2 of f, on every call of f).
_SMOOTH_FOR: dict[object, tuple[bool, dict[tuple, None]]] = {}
_SIGNATURES = 64
_KEPT = (str, bool, type(None), type(...), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _signature(args: tuple, kwargs: dict, numbers: bool) -> tuple:
    """What a fact's ``possible`` can read of the ops a call reaches, as far as the call decides it: its tensors'
    dtypes, its strings, bools, None, dtypes, devices, its keywords' names; numbers by type, and by value where
    ``numbers`` (a fact reached reads them: pow's exponent). Other values (shapes, slices) by type."""
    key = [tuple(kwargs)]
    for a in tree_leaves((args, kwargs)):
        if isinstance(a, Tensor):
            key.append(a.dtype)
        elif isinstance(a, _KEPT) or (numbers and isinstance(a, (int, float, complex))):
            key.append((type(a), a))  # (the type too: True == 1)
        else:
            key.append(type(a))
    return tuple(key)


def _known_smooth(func, args: tuple, kwargs: dict) -> bool:
    """Whether the watch saw ``func`` reach no kink op: for any arguments, or for calls with this signature."""
    if func in _SMOOTH_CALLS:
        return True
    seen = _SMOOTH_FOR.get(func)
    return seen is not None and _signature(args, kwargs, seen[0]) in seen[1]


# Callables whose aten ops depend on their arguments' kinds, not only their values: `b[idx] = x` reaches
# index_put_ (no kink op), `b[:] = x` into an integer b a cast (a jump). Remembered smooth by signature only: once
# a float `b[idx] = x` had run, every later __setitem__ ran unwatched (an int32 `b[:] = x` at a jump: slope 1)
_BY_SIGNATURE = {Tensor.__setitem__}


def _remember_smooth(func, args: tuple, kwargs: dict, watch: _KinkWatch) -> None:
    if not watch.conditional and func not in _BY_SIGNATURE:
        _SMOOTH_CALLS.add(func)
        return
    seen = _SMOOTH_FOR.get(func)
    numbers = watch.numbers or (seen is not None and seen[0])
    if seen is None or seen[0] != numbers:  # (keys without numbers say nothing of the number a fact reads)
        seen = _SMOOTH_FOR[func] = (numbers, {})
    if len(seen[1]) >= _SIGNATURES:
        del seen[1][next(iter(seen[1]))]  # the oldest
    seen[1][_signature(args, kwargs, numbers)] = None


_NO_TORCH_FUNCTION = dict.fromkeys(("has_torch_function", "has_torch_function_unary",
                                     "has_torch_function_variadic"), lambda *args, **kwargs: False)


@functools.cache
def _unguarded(func: types.FunctionType) -> types.FunctionType:
    """A copy of a Python function of torch.nn.functional whose ``has_torch_function`` guard is off. The mode
    sees such a composite (F.lp_pool1d, F.triplet_margin_with_distance_loss ...) as one call, and PyTorch runs its
    body with the mode suspended; running this copy under the mode instead sends the ops inside to their rules."""
    copy = types.FunctionType(func.__code__, {**func.__globals__, **_NO_TORCH_FUNCTION}, func.__name__,
                              func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


def _composite(func) -> bool:
    return isinstance(func, types.FunctionType) and func.__module__ == "torch.nn.functional"


def refuse_higher_order(func) -> None:
    """A higher-order op (``torch.cond``, ``map``, ``while_loop``) in f: PyTorch runs its branches as subgraphs
    below the modes gradwise follows f with, so their kinks would go unseen and cond's predicate is read in C++.
    NonsmoothError naming it and what to write instead (PyTorch raised NotImplementedError in gradwise's mode)."""
    name = "torch.cond" if func.name() == "cond" else f"the higher-order op {func.name()}"
    raise NonsmoothError(f"{name} (called at {_user_line()}) runs its branches as subgraphs that gradwise's "
                         "nonsmooth passes cannot follow (their kinks, and the predicate's side at a tie, would go "
                         "unseen). Inside f, choose the branch in Python (true_fn(x) if bool(pred) else "
                         "false_fn(x)) or with torch.where")


class _KinkWatch(LeanDispatchMode):
    supports_higher_order_operators = True  # (refused: `refuse_higher_order`)

    def __init__(self) -> None:
        super().__init__()
        self.kinky, self.hit, self.jump = False, None, False  # jump: the hit is a jump of `_JUMPS`
        # reached an op that kinks only for some arguments (a cast to an integer dtype, pow's exponent, div's
        # rounding mode) with arguments for which it cannot: the callable is smooth for calls like this one only
        # (`_signature`; numbers: by value, as a fact reached reads them)
        self.conditional, self.numbers = False, False
        # id(argument) -> (argument, where its tangent is nonzero): a jump counts only where the value moves
        self.moving: dict[int, tuple[Tensor, Tensor]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            refuse_higher_order(func)
        name = func.overloadpacket.__name__
        base = name[:-1] if name.endswith("_") else name
        if base.startswith("_foreach_"):  # a list of the op's calls: each element is tested as one
            return self._foreach(func, base[len("_foreach_"):], name.endswith("_"), args, kwargs)
        test = _KINKY_BY_NAME.get(base)
        possible = _POSSIBLE.get(base)
        if test is None:
            return func(*args, **kwargs)
        if possible is not None and not possible(OpCall(args, kwargs, None, name)):
            self.conditional = True
            self.numbers = self.numbers or base in _READS_NUMBERS
            out = func(*args, **kwargs)
            if base == "_to_copy":  # (float_power's cast of its base to complex128)
                onto_axis(args[0], out)
            return out
        self.kinky = True
        if self.hit is not None or not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return func(*args, **kwargs)
        if name.endswith("_"):  # in place: test the arguments before the op overwrites them
            before = tuple(_before(a) if isinstance(a, Tensor) else a for a in args)
            out = func(*args, **kwargs)
            args = before
        else:
            out = func(*args, **kwargs)
        moving = self.moving.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        # a jump counts only where x's own elements move: when x is the only argument that moves and the site's
        # mask is x's elementwise (searchsorted's moving boundaries, a broadcast divisor: the whole test)
        alone = not any(isinstance(a, Tensor) and a.requires_grad for a in (*args[1:], *kwargs.values()))
        mask = None
        if moving is not None and moving[0] is args[0] and alone and _JUMPS.get(base) is not None:
            site = _JUMPS[base].site(OpCall(args, kwargs, out, name))
            mask = None if site is None else site.mask() if callable(site.mask) else site.mask
            if site is not None and (mask is None or mask.shape != moving[1].shape):
                mask = None  # not x's elementwise: the whole test below
            elif site is None:
                mask = torch.zeros_like(moving[1])
        if mask is not None:
            if bool((mask & moving[1]).any()):
                self.hit = str(func.overloadpacket)
        elif test(args, kwargs, out):
            self.hit = str(func.overloadpacket)
        self.jump = self.hit is not None and base in _JUMPS
        return out

    def _foreach(self, func, base: str, inplace: bool, args, kwargs):
        test = _KINKY_BY_NAME.get(base)
        if test is None:
            return func(*args, **kwargs)
        self.kinky = True
        lists = [a for a in args if isinstance(a, (list, tuple))]
        if self.hit is not None or not any(isinstance(t, Tensor) and t.requires_grad for ts in lists for t in ts):
            return func(*args, **kwargs)
        before = [[_before(t) if isinstance(t, Tensor) else t for t in a]
                  if isinstance(a, (list, tuple)) else a for a in args] if inplace else args
        out = func(*args, **kwargs)
        outs = args[0] if inplace else out
        for i, o in enumerate(outs):
            one = tuple(a[i] if isinstance(a, (list, tuple)) else a for a in before)
            if test(one, kwargs, o):
                self.hit = f"aten.{base} (in {func.overloadpacket})"
                break
        return out


def _constant_if_stepped(a):
    return a.detach() if _stepped(a) else a


class DeferredJump(Exception):
    """A call reached an op that jumps (an integer cast, count_nonzero ...) at a point in a pass without
    tangents, where gradwise cannot tell whether the value there moves (a relu-dead 0 does not): the mode records
    a kink that sends the call to a pass along a direction, which decides. ``out``: the call's result."""

    def __init__(self, out, op: str):
        super().__init__(op)
        self.out, self.op = out, op


def _kink_free_call(func, args: tuple, kwargs: dict) -> tuple | None:
    """(``func(*args, **kwargs)``,) if the call reaches no aten op that has kinks, else None."""
    if _known_smooth(func, args, kwargs):
        return (func(*args, **kwargs),)
    watch = _KinkWatch()
    watch.hit = ""  # only record whether a kink op is reached
    with watch:
        out = func(*args, **kwargs)
    return None if watch.kinky else (out,)


def _before(a: Tensor) -> Tensor:
    """A copy of an in-place op's argument to test its kink on, as the argument is: marked as it is, and requiring
    grad where it does (a clone below autograd would not: the facts read that as "does not move", so
    ``_foreach_pow_([z], [p])`` took a moving integer p for a constant one and z ** p as entire on its cut)."""
    return same_axis(a, a.clone().requires_grad_(a.requires_grad))


def _no_forward_ad_is_an_error(func, args: tuple, kwargs: dict):
    """``func(*args, **kwargs)``; PyTorch's "forward AD not implemented" becomes a NonsmoothError naming the call."""
    try:
        return func(*args, **kwargs)
    except NotImplementedError as e:
        if "forward AD" not in str(e) and "forward mode AD" not in str(e):
            raise
        raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) has no forward-mode derivative in "
                             "PyTorch, which gradwise needs to follow a direction through it. PyTorch said: "
                             f"{str(e).splitlines()[0]}") from None


def _callable_name(func) -> str:
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(func)
    return f"{'Tensor.' if isinstance(func, type(Tensor.add)) else ''}{getattr(func, '__name__', func)}"


def _watched(func, args: tuple, kwargs: dict, involved: Callable):
    """``func(*args, **kwargs)``, raising NonsmoothError where an aten op inside it sits at a kink. With tangents
    the call is replayed on copies of the primals that require grad where the arguments depend on f's inputs (no
    forward-mode formulas, whose guards would look like kinks)."""
    watch = _KinkWatch()
    tangents = any(map(_is_dual, tree_leaves((args, kwargs))))
    if not tangents:  # (a list argument's tensors too: _foreach_, RNNs)
        if any(map(_stepped, tree_leaves((args, kwargs)))):  # x.floor().long(): the floor's value does not move
            args, kwargs = tree_map(_constant_if_stepped, args), tree_map(_constant_if_stepped, kwargs)
        with watch:
            out = func(*args, **kwargs)
    else:
        def copy(a):  # a non-leaf copy where it depends on the inputs: in-place calls work on it as on a
            if not (isinstance(a, Tensor) and (a.is_floating_point() or a.is_complex())):
                return a
            p, t = _split(a)
            p = p.detach()
            moves = involved(a) and (t is None or bool(t.any()))  # (a zero tangent: a constant along d)
            if not moves:
                return same_axis(a, p.clone())
            c = same_axis(a, p.requires_grad_(True).clone())
            if t is not None:
                watch.moving[id(c)] = (c, t != 0)
            return c

        with torch.enable_grad():  # before the call, which may write into args
            replay = tree_map(copy, args), tree_map(copy, kwargs)
        out = _no_forward_ad_is_an_error(func, args, kwargs)
        with torch.enable_grad(), watch:
            func(*replay[0], **replay[1])
    if watch.jump and not tangents:
        raise DeferredJump(out, watch.hit)
    if watch.hit is not None:
        raise NonsmoothError(f"{_callable_name(func)} (called at {_user_line()}) reaches {watch.hit} at its kink, "
                             "and gradwise has no kink rule for it: its derivative there would be PyTorch's "
                             "convention. Write it with ops that have rules (abs, clamp, maximum, max, sort, max_pool, "
                             "linalg.vector_norm ...); docs/nonsmooth.md lists them")
    if not watch.kinky:
        _remember_smooth(func, args, kwargs, watch)
    return out
