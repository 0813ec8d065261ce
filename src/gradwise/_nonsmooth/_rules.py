"""The kink-rule table: ``KINK_RULES`` (aten op -> rule), ``_ROUTES`` (callable -> rule), ``UNRULED``, the
registrar ``kink_rule`` / ``_registrar``, ``rule_for``, and the helpers rules share (``_split``, ``_switch``,
``_resolve_sign``, ``_finish``, ``_is_dual``, ``_needs_grad`` ...).

May import: torch, gradwise._graph, gradwise._masks, ``_errors``, ``_records``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from gradwise import _graph
from gradwise._masks import mask_all, mask_any
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._records import _Run, _user_line

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ rule table

KINK_RULES: dict[object, Callable] = {}
_ROUTES: dict[Callable, Callable] = {}
# Calls that may cast a float tensor to an integer or bool dtype, routed to `_rules_pointwise.integer_cast` (to a
# float dtype or a device: PyTorch's own). Routed rather than watched: a watched callable that reaches no kink op
# is remembered as smooth, and Tensor.to(torch.float64) reaches none where Tensor.to(torch.long) jumps.
CASTS = (Tensor.to, Tensor.type, Tensor.type_as, Tensor.long, Tensor.int, Tensor.short, Tensor.char, Tensor.byte,
         Tensor.bool, torch.as_tensor, torch.asarray)
# Ops with kinks but no rule: f hitting one with a direction gets a clear error instead of a silent convention.
UNRULED: dict[Callable, str] = {}
# Routes for some calls only: callable -> whether a call (args, kwargs) takes its route. torch.div jumps with a
# rounding mode only; true division keeps its forward-mode route (`_rules_jvp._mixed`) and the native path.
_ROUTE_IF: dict[Callable, Callable[[tuple, dict], bool]] = {}


def route(func, args: tuple, kwargs: dict) -> Callable | None:
    """The rule a torch-level call is routed to, or None (no route, or a conditional route this call skips)."""
    rule = _ROUTES.get(func)
    if rule is not None and func in _ROUTE_IF and not _ROUTE_IF[func](args, kwargs):
        return None
    return rule


def _registrar(table: dict, routes: dict) -> Callable:
    """A decorator factory filling ``table`` (keyed by aten op) and ``routes`` (torch-level callables)."""

    def register_for(op, *calls: Callable):
        def register(rule: Callable) -> Callable:
            table[op] = rule
            for c in calls:
                routes[c] = rule
            return rule

        return register

    return register_for


kink_rule = _registrar(KINK_RULES, _ROUTES)
kink_rule.__doc__ = "Register a rule for aten ``op``; ``calls`` are the torch-level callables that reach it."


def rule_for(op) -> Callable:
    """The kink rule for an aten op (the one lookup point)."""
    try:
        return KINK_RULES[op]
    except KeyError:
        raise NonsmoothError(f"gradwise has no kink rule for {op}; the ops with rules are: "
                             f"{', '.join(sorted(str(k) for k in KINK_RULES))}") from None


def call_rule(rule: Callable, run: _Run, func, args: tuple, kwargs: dict):
    """``rule(run, func, *args, **kwargs)``, with the arguments the caller named as torch does (``input=``,
    ``other=``) moved to their positions (a rule names its parameters its own way: ``torch.gt(x, other=y)``
    crashed it). A TypeError the rule still raises where PyTorch's own call does not is gradwise's: it becomes
    a NonsmoothError naming the op (raised through an operator, ``x > y``, a TypeError read "'>' not supported")."""
    args, kwargs = _positional(rule, func, args, kwargs)
    try:
        return rule(run, func, *args, **kwargs)
    except TypeError as e:
        try:  # (on copies: the call may write in place)
            func(*_copies(args), **dict(zip(kwargs, _copies(tuple(kwargs.values())), strict=True)))
        except TypeError:
            raise e from None  # the call is PyTorch's error too
        except Exception:  # (PyTorch raises otherwise: the rule's TypeError is still gradwise's)
            pass
        name = getattr(func, "__name__", str(func))
        raise NonsmoothError(f"gradwise's kink rule for {name} (called at {_user_line()}) failed on these "
                             f"arguments ({type(e).__name__}: {e}); PyTorch accepts them. Please report this; "
                             "passing the arguments by position may avoid it") from e


def _copies(args: tuple) -> tuple:
    return tuple(a.detach().clone() if isinstance(a, Tensor) else type(a)(_copies(tuple(a)))
                 if type(a) in (list, tuple) else a for a in args)


@functools.cache
def _binder(rule: Callable) -> tuple[inspect.Signature | None, frozenset | None]:
    """The rule's signature, and the keywords it takes by name (None: it has ``**kwargs``, binding decides)."""
    try:
        sig = inspect.signature(rule)
    except (TypeError, ValueError):
        return None, None
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return sig, None
    return sig, frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


@functools.cache
def _rule_ops() -> dict[int, Any]:
    return {id(r): op for op, r in KINK_RULES.items()}


def _binds(sig: inspect.Signature, args: tuple, kwargs: dict) -> bool:
    try:
        sig.bind(None, None, *args, **kwargs)
        return True
    except TypeError:
        return False


def _positional(rule: Callable, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args, kwargs`` with the keywords the rule does not take moved to their positions in the op's aten schema
    (the first overload whose positional names cover them; torch's ``input`` is the schema's ``self``)."""
    if not kwargs:
        return args, kwargs
    sig, names = _binder(rule)
    if sig is None or (names is not None and names.issuperset(kwargs)) or _binds(sig, args, kwargs):
        return args, kwargs  # (the everyday call, clamp(x, min=0), takes the set test only)
    op = func if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else _rule_ops().get(id(rule))
    if op is None:
        return args, kwargs
    packet = op.overloadpacket if isinstance(op, torch._ops.OpOverload) else op
    for name in packet.overloads():
        schema = getattr(packet, name)._schema
        moved, rest = list(args), dict(kwargs)
        for a in [a for a in schema.arguments if not a.kwarg_only][len(args):]:
            key = a.name if a.name in rest else "input" if a.name == "self" and "input" in rest else None
            if key is None:
                break
            moved.append(rest.pop(key))
        if _binds(sig, tuple(moved), rest):
            return tuple(moved), rest
    return args, kwargs


_UNPACK_DUAL = torch._C._VariableFunctions._unpack_dual  # torch._VF's, without its module __getattr__


def _unpack(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``fwAD.unpack_dual(x)`` at the current level, without its Python layers (an export-mode lookup and a
    namedtuple): rules call it several times per op, and it was ~1/8 of a pass's time."""
    level = fwAD._current_level
    return (x, None) if level < 0 else _UNPACK_DUAL(x, level=level)


def _split(x) -> tuple[Tensor, Tensor | None]:
    if not isinstance(x, Tensor):
        return x, None
    return _unpack(x)


def _tied_rows(mask: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


class _LazyRows:
    """``_tied_rows(mask)``, computed on the first call (``mask`` may be a callable building it)."""

    def __init__(self, mask: Tensor | Callable[[], Tensor]):
        self.mask, self.rows = mask, None

    def __call__(self) -> Tensor:
        if self.rows is None:
            self.rows = _tied_rows(self.mask() if callable(self.mask) else self.mask)
        return self.rows


def _near_zero(t: Tensor, tol: float) -> bool:
    """Whether some |t| <= tol: one min-reduction instead of a full-size boolean pass (the everyday path). For
    exact ties, whether some t == 0: ``t.bool()`` is t != 0 (a NaN is nonzero), a conversion and a byte minimum,
    about half of |t|'s pass and its min (a comparison kernel costs ~10x the conversion on CPU)."""
    if t.numel() == 0:
        return False
    t = t.detach()
    if tol == 0 and not t.is_complex():
        return not mask_all(t.bool())
    m = float(t.abs().amin())
    if m != m:  # amin propagates NaN: look past it
        return bool(mask_any(t.abs() <= tol))
    return m <= tol


# --- elementwise switches ----------------------------------------------------------------------------------


def _resolve_sign(run: _Run, op: str, s, tie, **kw):
    """At the tied elements of a switch on the sign of ``s``: which side (0: s > 0, 1: s < 0) wins along the
    direction, comparing the tangent of ``s`` with 0 (for a comparison, where that is 0, its second-order tangent:
    `_second_order_key`), then further directions. Returns (rows, choice, still)."""
    sp, st = _split(s)
    rows = _tied_rows(tie)
    ds = st.reshape(-1)[rows] if st is not None else sp.new_zeros(len(rows))
    constant = kw.pop("constant", False)
    second = kw.get("comparison") and st is not None and mask_any(ds == 0)
    if second:
        if isinstance(constant, Tensor):
            constant = torch.broadcast_to(constant, sp.shape).reshape(-1)[rows]
        moving = (ds == 0) & ~torch.as_tensor(constant, device=ds.device)
        second = mask_any(moving)
        if second:
            ds = _second_order_key(run, op, sp, rows, ds, moving)
    key = torch.stack([ds, torch.zeros_like(ds)], 1)
    cand = torch.ones(len(rows), 2, dtype=torch.bool, device=sp.device)
    values = lambda: torch.stack([s.reshape(-1)[rows], torch.zeros_like(s.reshape(-1)[rows])], 1)
    hold = ds == 0 if kw.get("comparison") and run.ray and st is not None else None
    if hold is not None and mask_any(hold):  # (directional_derivative: the tie stays, no further direction)
        key = torch.where(hold.unsqueeze(1), 0.0, key)
        kw["comparison"] = False  # (its ties are not counted as unresolved: no further directions for them)
        choice, still = run.resolve(op, "select", cand, key, values, **kw)
        still = hold | (torch.zeros_like(hold) if still is None else still)
        run.kinks[-1].comparison = True
    else:
        choice, still = run.resolve(op, "select", cand, key, values, **kw)
    if second:
        run.kinks[-1].second_order = True
    return rows, choice, still


# a comparison's tied elements whose argument has tangent 0: their second-order tangents take three reverse
# passes together; where an op has no third derivative, two each, for at most this many (more is an error)
SECOND_ORDER_ROWS = 64


def _constant_where(run: _Run, v) -> Tensor | bool:
    """True where ``v`` is known to be constant along the direction: not a tensor, or no tangent (everywhere); an
    input's (or its view's) elements the direction does not move; relu-dead elements (`_Run.flat_source`)."""
    if not isinstance(v, Tensor) or _split(v)[1] is None:
        return True
    if run.input_view(*_split(v)):  # an input's element that the direction does not move stays where it is
        return _split(v)[1] == 0
    src = run.flat_source(v) if run.tie_tol == 0 else None
    if src is None:
        return False
    dead = _split(v)[0].detach() == src[0]
    return dead if src[1] is None else dead & ~src[1]


def _second_order_key(run: _Run, op: str, sp: Tensor, rows: Tensor, ds: Tensor, moving: Tensor) -> Tensor:
    """``ds`` (the tangent s'(x; d) of a comparison's argument at its tied elements), with the second-order
    tangent s''(x; d) = d^T (Hessian of s) d where ds is 0 and s is not known to be constant (``moving``). Along
    x + t d, s = t s' + t^2 s'' / 2 + ...: where s' is 0 the sign of s'' says which side of the jump the element
    goes to (x * x > 0 at 0: True), which further directions cannot tell (their tangents are of other rays).
    s'' is 0 where s is locally constant (a relu-dead unit, a saturated clamp, floor(x) == 2: PyTorch's derivative
    formulas there are constant zeros); it is also 0 for an s that moves at third order or higher (x ** 3 > 0 at
    0): there the tangents of order 3 to HIGHEST_ORDER decide (the first nonzero one), and where all are 0 the
    element keeps its value (docs/nonsmooth.md).

    Computed by reverse passes through the pass's graph (the primal graph, which is f's locked piece, not the
    tangents: PyTorch's double-backward formulas), twice: along d and along 0.7 d, whose s'' is 0.49 times d's. An
    s that is constant along d but written with cancelling terms ((x + y)**2 - x**2 - 2*x*y - y**2, a variance as
    mean(x²) - mean(x)² along a constant shift) gets an s'' of rounding noise, which does not scale so: it counts
    as 0. A pass without a graph (directional_derivative's) sets ``run.needs_second``: the engine runs it again
    with one."""
    zero = moving.nonzero().squeeze(1)
    if run.leaves is None or not sp.requires_grad:
        run.needs_second = run.needs_second or run.leaves is None
        return ds
    leaves, dirs = run.leaves
    pairs = [(leaf, d) for leaf, d in zip(leaves, dirs, strict=True) if d is not None]
    second, opaque = second_order_tangents(op, pairs, sp, rows[zero])
    out = ds.clone()
    if second is not None:
        out[zero] = second.to(out.dtype)
    if opaque and mask_any(out[zero] == 0):
        _refuse_opaque(op, sp, opaque)
    return out


_SCALE = 0.7  # (not a power of 2: rounding noise in s'' then does not scale as _SCALE**2)


def second_order_tangents(op: str, pairs: list, sp: Tensor, picked: Tensor) -> tuple[Tensor | None, Any]:
    """d^T (Hessian of sp) d at the flat indices ``picked`` of ``sp`` for the (leaf, d) ``pairs``, with rounding
    noise set to 0 (computed along d and 0.7 d, see `_second_order_key`), and whether a backward on the way builds
    no graph (`_second_orders`: False, True or the custom Function's class). None: 0 everywhere."""
    with torch._C.DisableTorchFunction(), torch.enable_grad():  # (gradwise's own graph work: not f's ops)
        orders, opaque = _second_orders(op, pairs, sp, picked)
        if any(t is not None and mask_any(t != 0) for t in orders):
            scaled, _ = _second_orders(op, [(p, d * _SCALE) for p, d in pairs], sp, picked)
            kept = _signals(orders, scaled)
            if _noise_stopped(orders, scaled, kept):  # (once, with every order asked in both runs)
                orders, _ = _second_orders(op, pairs, sp, picked, every=True)
                scaled, _ = _second_orders(op, [(p, d * _SCALE) for p, d in pairs], sp, picked, every=True)
                kept = _signals(orders, scaled)
            orders = kept
        # where s' = s'' = 0, the first nonzero higher-order tangent decides (x ** 3 > 0 at 0: True along +1)
        second = None
        for t in orders:
            if t is not None:
                second = t if second is None else torch.where(second != 0, second, t)
    return second, opaque


def _signals(orders: list, scaled: list) -> list:
    """Each order's tangents where they scale as tangents do between d and 0.7 d (`_signal`); an order one run did
    not reach counts as 0 there."""
    scaled = [*scaled, *[None] * (len(orders) - len(scaled))]
    return [_signal(t, u, _SCALE ** (k + 2)) for k, (t, u) in enumerate(zip(orders, scaled, strict=False))]


def _noise_stopped(orders: list, scaled: list, kept: list) -> bool:
    """Whether an element whose kept tangents are all 0 had a nonzero one in either run that stopped short of
    HIGHEST_ORDER: a rounding-noise s'' (a variance mean(x²) - mean(x)² along a constant shift) counted as found,
    so its higher orders were not asked (+ (x0 - 1)³ then kept the tie's value: slope -0.9 where f's is 0.9)."""
    if max(len(orders), len(scaled)) >= HIGHEST_ORDER - 1 or not any(t is not None for t in kept):
        return False
    zero = None
    for t in kept:
        if t is not None:
            zero = (t == 0) if zero is None else zero & (t == 0)
    raw = [t != 0 for t in [*orders, *scaled] if t is not None]
    return bool(raw) and mask_any(zero & torch.stack(raw).any(0))


def _signal(value: Tensor | None, scaled: Tensor | None, factor: float) -> Tensor | None:
    """``value`` where ``scaled`` (the same along 0.7 d) is ``factor`` times it, else 0 (rounding noise)."""
    if value is None:
        return None
    scaled = value.new_zeros(()) if scaled is None else scaled / factor
    rtol = torch.finfo(value.dtype).eps ** 0.5 if value.is_floating_point() else 0.0
    return torch.where((value - scaled).abs() <= rtol * torch.maximum(value.abs(), scaled.abs()), value, 0.0)


def _second_orders(op: str, pairs: list, sp: Tensor, picked: Tensor, every: bool = False) -> tuple[list, Any]:
    """[s'', then higher orders] at the flat indices ``picked`` of ``sp``: d^T (Hessian of sp) d, detached (None:
    sp's first derivative along the directions is constant, so they are 0), then where some is 0 the tangents of
    order 3 and up (`_higher_orders`; ``every``: for every element, not only those whose s'' is 0); and whether
    a custom Function's backward on the way builds no
    graph (``once_differentiable``, or run under no_grad / outside autograd): its derivative would read 0, so
    the s'' found would miss its part (`_cut_backwards`: then that Function's class, else True). Three reverse
    passes for all together; two each where an op has no third derivative."""
    try:  # all elements at once: s''_i = d/dw_i of sum_i w_i s_i''
        w = sp.new_zeros(len(picked), requires_grad=True)
        y = (sp.reshape(-1)[picked] * w).sum()
        with _cut_backwards(sp) as cut:
            grads = torch.autograd.grad(y, [p for p, _ in pairs], create_graph=True, allow_unused=True)
        # (a gradient cut from w in an aten op is no evidence: floor, sign and casts have constant-zero backwards)
        if cut or any(g is not None and g.requires_grad and _delayed_error(g) for g in grads):
            return [None], cut[0] if cut else True
        first = _along(pairs, y, create_graph=True)
        along2 = _along(pairs, first, create_graph=True)
        second = None if along2 is None or not along2.requires_grad else \
            torch.autograd.grad(along2, w, allow_unused=True, retain_graph=True)[0]
        higher = _higher_orders(pairs, along2, w, None if every else second)
    except RuntimeError as e:  # an op whose double backward has no derivative: one element at a time
        if "once_differentiable" in str(e):
            return [None], True
        if len(picked) > SECOND_ORDER_ROWS:
            raise NonsmoothError(f"{op} at {_user_line()}: {len(picked)} tied elements whose argument has tangent "
                                 "0 along the direction; which side of the jump each goes to is a second-order "
                                 "question, and an op on the way has no third derivative in PyTorch (gradwise "
                                 f"then computes them one by one, at most {SECOND_ORDER_ROWS}). Keep the "
                                 "comparison's argument off its jump, or compare a quantity that moves at first "
                                 "order") from None
        higher = []  # (one by one: not asked further)
        try:
            second = torch.stack([_along(pairs, _along(pairs, sp.reshape(-1)[r], create_graph=True))
                                  for r in picked.tolist()])
        except RuntimeError as e:  # (NotImplementedError too: `_cdist_backward` has no derivative)
            raise NonsmoothError(f"{op} at {_user_line()}: its argument has tangent 0 along the direction, so "
                                 "which side of the jump it goes to is a second-order question, and an op on "
                                 f"the way has no second derivative in PyTorch ({str(e).splitlines()[0]}). Keep "
                                 "the comparison's argument off its jump, or compare a quantity that moves at "
                                 "first order") from None
    return [None if second is None else _split(second)[0].detach(), *higher], False


HIGHEST_ORDER = 6  # tangents up to this order decide a comparison whose argument's lower ones are 0


def _higher_orders(pairs: list, along2: Tensor | None, w: Tensor, second: Tensor | None) -> list:
    """The tangents of order 3 .. HIGHEST_ORDER of the elements whose lower ones are all 0 (``along2`` is
    sum_i w_i s_i''), detached, one reverse pass each; None for an order whose tangents are all 0. Stops where
    PyTorch has no derivative on the way: those elements keep their value, as a constant argument's does (a
    saturated clamp: every order 0)."""
    out, along, found = [], along2, None if second is None else second != 0
    for _ in range(3, HIGHEST_ORDER + 1):
        if along is None or not along.requires_grad or (found is not None and mask_all(found)):
            break
        try:
            along = _along(pairs, along, create_graph=True)
            if along is None or not along.requires_grad:
                break
            value = torch.autograd.grad(along, w, allow_unused=True, retain_graph=True)[0]
        except (RuntimeError, NotImplementedError):
            break
        value = None if value is None else _split(value)[0].detach()
        out.append(value)
        if value is not None:
            found = value != 0 if found is None else found | (value != 0)
    return out


@contextlib.contextmanager
def _cut_backwards(sp: Tensor) -> Iterator[list]:
    """While a reverse pass from ``sp`` runs with create_graph: a list that gets an entry for each custom
    autograd.Function whose backward, given an incoming gradient that is part of the graph, returns a gradient
    that is not (computed under no_grad, with NumPy, detached, or a constant zero). A backward written with torch
    ops under autograd returns gradients linear in the incoming one, so part of the graph: its derivative is
    read; one that is cut reads 0 and hides the second-order part through it (a constant-zero custom backward,
    a custom floor, is refused with it: not told apart)."""
    cut: list = []

    def check(node):
        def hook(grad_inputs, grad_outputs):
            incoming = [g for g in grad_outputs if g is not None and g.requires_grad]
            if incoming and any(g is not None and not _reaches(g, incoming) for g in grad_inputs):
                cut.append(node._forward_cls)
        return hook

    handles = [node.register_hook(check(node)) for node in _graph.nodes((sp.grad_fn,))
               if getattr(node, "_forward_cls", None) is not None]
    try:
        yield cut
    finally:
        for h in handles:
            h.remove()


def _reaches(g: Tensor, incoming: list[Tensor]) -> bool:
    """Whether gradient ``g`` is part of the graph of an ``incoming`` gradient: ``2 * a * grad.detach()`` requires
    grad through the saved ``a`` but not through the incoming gradient, so its derivative misses that part. An
    incoming gradient without a node (a leaf) cannot be looked for: taken as reached."""
    if not g.requires_grad:
        return False
    nodes = {t.grad_fn for t in incoming}
    return None in nodes or any(node in nodes for node in _graph.nodes((g.grad_fn,)))


def _delayed_error(g: Tensor) -> bool:
    """Whether the graph of gradient ``g`` holds the node a ``once_differentiable`` backward puts on its outputs
    (it raises when differentiated, and is connected to the incoming gradient only: no derivative reaches x)."""
    return any(node.name() == "torch::autograd::Error" for node in _graph.nodes((g.grad_fn,)))


def _refuse_opaque(op: str, sp: Tensor, found: Any = True) -> None:
    """An s'' of 0 through a backward that builds no graph is not evidence that s is constant (its derivative
    reads 0): NonsmoothError, naming the custom autograd.Function on the way (``found``, the class whose backward
    was seen to build none, else the first on the way; a module's backward hook excepted)."""
    from torch.nn.modules._functions import BackwardHookFunction
    classes = [found] if isinstance(found, type) else \
        [getattr(node, "_forward_cls", None) for node in _graph.nodes((sp.grad_fn,))]
    for cls in classes:
        if cls is not None and cls is not BackwardHookFunction:
            raise NonsmoothError(f"{op} at {_user_line()}: its argument has tangent 0 along the direction, and its "
                                 f"second-order tangent is taken through the custom autograd.Function "
                                 f"{cls.__qualname__}'s backward, whose own derivative reads as 0 where it is not "
                                 "differentiable (once_differentiable, computed under no_grad, detached or in "
                                 "NumPy, a constant zero), so which side of the jump it goes to is unknown. Keep "
                                 "the comparison's argument off its jump, or write the Function's backward with "
                                 "torch ops under autograd")
    raise NonsmoothError(f"{op} at {_user_line()}: its argument has tangent 0 along the direction, and a backward "
                         "on the way to it builds no graph, so its second-order tangent cannot be read: which side "
                         "of the jump it goes to is unknown. Keep the comparison's argument off its jump")


def _along(pairs: list, y: Tensor | None, create_graph: bool = False) -> Tensor | None:
    """The derivative of scalar y along the directions: sum over inputs of <grad y, d> (0 where y does not depend
    on them; None for a y that depends on nothing)."""
    if y is None or not y.requires_grad:
        return y.new_zeros(()) if y is not None else None
    grads = torch.autograd.grad(y, [p for p, _ in pairs], create_graph=create_graph, allow_unused=True,
                                retain_graph=True)
    terms = [(g * d).sum() for g, (_, d) in zip(grads, pairs, strict=True) if g is not None]
    return torch.stack(terms).sum() if terms else y.new_zeros(())


def _switch(run: _Run, op: str, s, pos, neg, native: Callable, *, jumps: bool = False, flat: bool = False,
            skip: Callable | None = None, inplace: bool = False, unmoved: bool = False):
    """Elementwise ``pos`` where s > 0, ``neg`` where s < 0; at s == 0 the piece that wins along the direction.

    For continuous ops (relu, max, clamp ...) both pieces agree where s == 0, so the tangent there is that of
    the winning piece: the exact one-sided derivative. Ops that ``jumps`` (threshold, hardshrink) have
    different pieces at s == 0, where their value is ``neg``'s: moving to the other piece there is an error, not a
    derivative. ``unmoved`` (jumps only): s is an input of f shifted by a constant (`_Run.input_view`), so where
    its tangent along the direction is 0 it stays on its tie: ``neg`` there, exactly. ``flat``: ``neg``
    is a constant that ``pos`` never equals where s > 0 (relu), so the output equals it exactly where it is dead.
    ``skip(tie)``: the tied elements that are no kink (both sides locally constant and equal), or None.
    ``inplace``: the caller writes the result into s (``relu_``), and so over s' (which a record reads later).
    """
    sp, st = _split(s)
    if run.near_tol is not None:
        run.note_near(op, sp.abs())
    tie = None
    if _near_zero(sp, run.tie_tol):  # one min-reduction: cheaper than a full-size mask where nothing ties
        if inplace and st is not None:
            st = st.clone()
        if not jumps and skip is None and _sign_lockable(run, sp, st, pos, neg):
            return _sign_locked(run, op, sp, st, pos, flat)
        # (sp.bool() is sp != 0, a NaN nonzero: a conversion costs ~1/10 of a comparison kernel on CPU)
        tie = sp.bool().logical_not_() if run.tie_tol == 0 else sp.abs() <= run.tie_tol
        dead = skip(tie) if skip is not None else None
        if dead is not None:
            tie = tie & ~dead
            tie = tie if mask_any(tie) else None
    if tie is None:
        out = native() if native is not None else torch.where(sp > 0, pos, neg)
        if flat:
            run.mark_flat(out, neg, None)
        return out
    if not jumps and run.ranks_alone(st):  # the choice is the sign of s' at each tie: elementwise
        # pos where s > 0 or NaN (NaN propagates through pos, as in PyTorch's kernels), or s == 0 and s' >= 0
        # (or NaN): where s' stands in for s at the ties, pos unless the result is < 0
        # contiguous: the lock is written through a flat view (a transposed input gives strided masks)
        lock = torch.lt(torch.where(tie, st, sp), 0).logical_not_().contiguous()
        rows = _LazyRows(tie)
        _sign_record(run, op, st, rows).write = lambda c: lock.data.view(-1).index_put_((rows(),), c == 0)
    else:
        forced = len(run.kinks) in run.forced
        rows, choice, _ = _resolve_sign(run, op, s, tie)
        if jumps:
            choice = _jump_side(run, op, rows, choice, pos, neg, sp, st is not None, unmoved and not forced)
        lock = torch.le(sp, 0).logical_not_().contiguous()
        lock.view(-1)[rows] = choice == 0
        run.kinks[-1].write = lambda c: lock.data.view(-1).index_put_((rows,), c == 0)
    out = torch.where(lock, pos, neg)
    if flat and run.tie_tol == 0:  # the tied elements sit on the kink: live, whichever side is locked
        run.mark_flat(out, neg, tie)
    return out


def _jump_side(run: _Run, op: str, rows: Tensor, choice: Tensor, pos, neg, sp: Tensor, tangent: bool,
               unmoved: bool) -> Tensor:
    """The sides a jumping switch takes at its ties (``choice``: 0 is ``pos``, the other piece): an error where one
    crosses to a piece of another value. Where s is an unmoved input (``unmoved``, see `_switch`) whose tangent along
    the first direction (the record's first key) is 0, the element stays on its tie: ``neg``, no crossing."""
    record = run.kinks[-1]
    pp, nn_ = (torch.broadcast_to(torch.as_tensor(_split(v)[0], dtype=sp.dtype), sp.shape).reshape(-1)[rows]
               for v in (pos, neg))
    crossing = (pp != nn_) & (choice == 0)
    if unmoved and tangent and crossing.any():
        stays = crossing & (record.keys[0][:, 0] == 0)
        choice = torch.where(stays, torch.ones_like(choice), choice)
        record.choice, crossing = choice, crossing & ~stays
    if crossing.any():
        _jump_error(op, record if tangent else None, crossing)
    return choice


def _jump_error(op: str, record, crossing: Tensor):
    """The error at a jump a switch's chosen side crosses. Where s' along the direction is 0 (the side came from
    further directions), s does not move to first order along it: it may stay on its tie (f continuous along d)
    or cross at second order (a curved boundary: renorm's norm along a tangent), which tangents cannot tell."""
    first = record.keys[0][:, 0] if record is not None and record.keys else None
    if first is not None and bool((first[crossing] == 0).all()):
        raise NonsmoothError(f"{op} at {_user_line()} sits at its jump, and its argument does not move to first "
                             "order along this direction (tangent 0): whether f stays continuous or jumps is decided "
                             "by higher-order terms, which gradwise does not follow. A direction that moves that "
                             "element (or none that reaches it) is decided exactly")
    raise NonsmoothError(f"{op} at {_user_line()} jumps here: f is discontinuous at x along this direction, so the "
                         "one-sided derivative does not exist")


def _sign_record(run: _Run, op: str, st: Tensor, rows: _LazyRows):
    """The `_LazyKink` of a switch whose ties the sign of s' ranks, as `_resolve_sign` records it: two candidates
    per tie, the key (s', 0), the s < 0 side (choice 1) where s' < 0; gathered if read. The caller sets its
    ``write``."""
    ds = lambda: st.reshape(-1)[rows()]
    return run.lazy_record(op, "select", lambda: torch.ones(len(rows()), 2, dtype=torch.bool, device=st.device),
                           lambda: [torch.stack([d := ds(), torch.zeros_like(d)], 1)],
                           lambda: (ds() < 0).to(torch.int64))


# value, scale: both representable, their product takes the dtype's smallest subnormal to 4 (see `_sign_lock`)
_SIGN_LOCK_SCALES = {torch.float32: (2.0**51, 2.0**100), torch.float64: (2.0**53, 2.0**1023)}


def _sign_lockable(run: _Run, sp: Tensor, st: Tensor | None, pos, neg) -> bool:
    """Whether `_sign_locked` applies: ties ranked by this pass's tangent alone, ``neg`` the number 0 (relu),
    ``pos`` a tensor shaped and typed like s, a dtype `_sign_lock` knows."""
    return isinstance(neg, (int, float)) and neg == 0 and isinstance(pos, Tensor) and run.ranks_alone(st) \
        and sp.dtype in _SIGN_LOCK_SCALES and st.dtype == sp.dtype and pos.dtype == sp.dtype \
        and pos.shape == sp.shape == st.shape


def _sign_lock(sp: Tensor, st: Tensor) -> Tensor:
    """A float per element that is not <= -0.5 (a NaN is not) exactly where a switch on the sign of s takes its
    s > 0 side (s > 0 or NaN, or s == 0 and not s' < 0: as `_switch`'s boolean lock), and lies in [-1, 1] exactly
    where s == 0.

    It is sign(s') (NaN: 0) + s * 2^k, with 2^k so large that any nonzero s, a subnormal included, outweighs the
    sign (|s 2^k| >= 4; an overflow to inf keeps the sign; a NaN s stays NaN). Two float passes instead of a
    boolean compare, where and not: boolean kernels are 3-4x slower on CPU."""
    value, scale = _SIGN_LOCK_SCALES[sp.dtype]
    sign = torch.sign(st.detach()).contiguous()  # written through a flat view: see `_sign_locked`
    if sign.device.type != "cpu":  # the CPU kernel gives sign(NaN) = 0 (the tests check it); elsewhere make sure
        sign.nan_to_num_(0.0)
    return sign.addcmul_(sp.detach(), torch.tensor(scale, dtype=sp.dtype, device=sp.device), value=value)


def _masked(x, key: Tensor, threshold: float) -> Tensor:
    """x where key > threshold (or NaN), else 0: ``threshold_backward``, with x's tangent masked the same way here.
    PyTorch's own forward-mode formula for it adds a zero tensor (a full extra pass), and a tangent it computes
    from a primal that requires grad is itself recorded for autograd (a graph nobody reads)."""
    xp, xt = _split(x)
    out = torch.ops.aten.threshold_backward(xp, key, threshold)
    if xt is None:
        return out
    with torch.no_grad():
        tangent = torch.ops.aten.threshold_backward(xt, key, threshold)
    return fwAD.make_dual(out, tangent)  # outside no_grad: the dual is a view of out, in out's graph


def _sign_locked(run: _Run, op: str, sp: Tensor, st: Tensor, pos: Tensor, flat: bool) -> Tensor:
    """`_switch` with ``neg`` = 0 and its ties ranked by s' alone: ``pos`` where not `_sign_lock` <= -0.5, else 0, as
    ``threshold_backward`` (a vectorized masked copy whose tangent and gradient are the same masked copy). The
    tie mask, the record's tensors and the relu-dead mark's live mask are built only if read."""
    key = _sign_lock(sp, st)
    out = _masked(pos, key, -0.5)
    tie = lambda: key.abs() <= 1  # written ties stay within [-1, 1]
    rows = _LazyRows(tie)
    _sign_record(run, op, st, rows).write = lambda c: key.data.view(-1).index_put_(
        (rows(),), (c == 0).to(key.dtype).mul_(2).sub_(1))
    if flat:  # the tied elements sit on the kink: live, whichever side is locked
        run.mark_flat(out, 0.0, tie)
    return out


def _finish(func, x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """In-place variants write the locked result back into x."""
    return x.copy_(out) if inplace and out is not x else out


# autograd nodes of piecewise-constant ops: their output is constant around x wherever it is defined (their own
# jumps are their rules' concern), so an op reading it does not move
_STEP_NODES = frozenset(("FloorBackward0", "CeilBackward0", "RoundBackward0", "RoundBackward1", "TruncBackward0",
                         "SignBackward0", "SgnBackward0", "DivBackward2", "DivBackward3"))  # div: rounding modes


def result_type_of(a: Tensor, b) -> torch.dtype:
    """``torch.result_type`` for an operand it does not take (a NumPy array), converted as torch's ops do."""
    return torch.result_type(a, torch.as_tensor(b, device=a.device))


def promoted(v, dtype: torch.dtype, device: torch.device):
    """A bool operand as a number of the comparison's dtype, a NumPy one as a tensor; anything else as it is."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, Tensor):
        return v.to(dtype) if v.dtype == torch.bool else v
    return v if isinstance(v, (int, float)) else torch.as_tensor(v, dtype=dtype, device=device)


def _stepped(a) -> bool:
    return isinstance(a, Tensor) and a.grad_fn is not None and type(a.grad_fn).__name__ in _STEP_NODES


def _is_dual(a) -> bool:
    return isinstance(a, Tensor) and _unpack(a)[1] is not None


def _needs_grad(a) -> bool:
    return isinstance(a, Tensor) and a.requires_grad and torch.is_grad_enabled()
