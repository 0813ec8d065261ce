"""Public registration of strong-zero rules for ops gradwise does not know: ``torch.library`` custom ops, C++
extension ops (torchvision, torchaudio, your own).

An op without a rule that meets a structural zero in a backward runs as plain PyTorch with its outputs treated
as fully supported (listed by ``gw.unruled_ops()``): a NaN it multiplies by a zero may remain, never a wrong
finite number. ``register_rule`` tells gradwise how supports pass through such an op, usually the op that
computes a custom op's backward. See docs/nan-sources.md ("Rules for your own ops").

May import: torch, _rules, _rules_pointwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from gradwise._strong_zeros._rules import RULES, Rule, _annihilate, _is_float
from gradwise._strong_zeros._rules_pointwise import _linear, _mul

__all__ = ["RuleHandle", "Supports", "register_rule"]


class Supports:
    """What a rule function sees of the strong-zero state while a backward runs.

    A *support* is a bool tensor broadcastable to a tensor: True where the element may be nonzero, False where it
    is a structural zero (the output cannot depend on it through this path, so it is 0 whatever it multiplies).
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.declared: set[int] = set()  # ids of the tensors `set` was called on

    def of(self, t: object) -> torch.Tensor | None:
        """The support of ``t``, or None when every element may be nonzero (also for non-tensors)."""
        return self._inner.of(t)

    def set(self, t: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
        """Declare ``t``'s support (None: all may be nonzero). Elements where it is False are set to 0 in place
        (a NaN/Inf there would be a structural zero times NaN); returns ``t``."""
        if support is not None:
            support = support.to(device=t.device, dtype=torch.bool).expand(t.shape)
            _annihilate(t, support)
        self._inner.record(t, support)
        self.declared.add(id(t))
        return t


RuleFunction = Callable[[Any, tuple, dict, Supports], Any]


Weights = tuple[str | int, ...]  # arguments named in the schema, or positions (0 is the sensitivity)


def _weight_slots(func: Any, weights: Weights) -> list[tuple[int, str]]:
    """(position, name) of each argument ``weights`` names, from ``func``'s schema."""
    arguments = func._schema.arguments
    names = [a.name for a in arguments]
    slots = []
    for w in weights:
        i = w if isinstance(w, int) else names.index(w) if w in names else -1
        if not 0 < i < len(names):
            raise ValueError(f"gw.register_rule: {func} has no weights argument {w!r} (its arguments: {names}; "
                             f"not the first, the sensitivity)")
        slots.append((i, names[i]))
    return slots


def _unit(a: object) -> object:
    """A weight argument as ones: a tensor of any dtype (an integer or bool weight 0 multiplies too), a number
    (``float scale``), each tensor of a list."""
    if isinstance(a, torch.Tensor):
        return torch.ones_like(a)
    if isinstance(a, (list, tuple)):
        return type(a)(map(_unit, a))
    return type(a)(1) if isinstance(a, (int, float, complex)) else a


def _with_ones(func: Any, args: tuple, kwargs: dict, slots: list[tuple[int, str]]) -> tuple[tuple, dict]:
    """``args``, ``kwargs`` with each argument at ``slots`` replaced by ones (``_unit``)."""
    args, kwargs = list(args), dict(kwargs)
    for i, name in slots:
        if i < len(args):
            args[i] = _unit(args[i])
        elif name in kwargs:  # (an argument left to its default)
            kwargs[name] = _unit(kwargs[name])
    return tuple(args), kwargs


def _zeros_as_ones(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The other floating arguments (after the sensitivity: tensors, numbers, tensors of a list) with each value
    that is 0 in the sensitivity's dtype or their own (below the smallest normal of either: a float64 weight of
    1e-60 is 0 once a float32 kernel casts it) replaced by 1, or None when none holds one: the reach of a
    weight 0, for a placement that was not told which arguments are weights. (Integer arguments are indices
    and sizes: an integer weight must be named.)"""
    sens = args[0]
    tiny = torch.finfo(sens.dtype).tiny if _is_float(sens) else 0.0

    def swap(a: object) -> object:
        if _is_float(a):
            small = a.abs() < max(tiny, torch.finfo(a.dtype).tiny)
            return a.masked_fill(small, 1) if bool(small.any()) else a
        if isinstance(a, float):
            return 1.0 if abs(a) < max(tiny, torch.finfo(torch.float64).tiny) else a
        if isinstance(a, (list, tuple)) and a and all(isinstance(x, torch.Tensor) for x in a):
            new = type(a)(map(swap, a))
            return new if any(x is not y for x, y in zip(new, a, strict=True)) else a
        return a

    new_args = (args[0], *map(swap, args[1:]))
    new_kwargs = {k: swap(v) for k, v in kwargs.items()}
    changed = any(a is not b for a, b in zip(new_args, args, strict=True)) or \
        any(new_kwargs[k] is not v for k, v in kwargs.items())
    return (new_args, new_kwargs) if changed else None


def _reach(func: Any, ones: torch.Tensor, swapped: tuple[tuple, dict], counts: Any) -> Any:
    """The counts with the small values of the other floating arguments as ones; where the op refuses a 1 there
    (an argument that is no weight: a probability, a size), ones everywhere: no output is a structural zero."""
    try:
        return func(ones, *swapped[0][1:], **swapped[1])
    except Exception:  # any refusal of the op's own: the sound answer is "all reached"
        cs = counts if isinstance(counts, (tuple, list)) else (counts,)
        reach = tuple(torch.ones_like(c) if isinstance(c, torch.Tensor) else c for c in cs)
        return reach if isinstance(counts, (tuple, list)) else reach[0]


def _placement_rule(weights: Weights | None) -> Rule:
    """The ``"placement"`` family, for an op that is a linear map of its first argument (the sensitivity) with
    weights that depend on the other arguments only: a scatter, a gather, a pooling or ROI pooling/align
    backward. It runs again on the sensitivity's support as 0/1 numbers; an output no supported element reaches
    (count 0) is a structural zero. A weight of exactly 0 is a value, not a structural zero: the forward read
    the element it multiplies (0 x NaN is NaN there, and the loss with it), so the count must not take the weight
    as given where it may be 0.

    - ``weights`` named (argument names or positions): the counts run with those arguments as ones, so an
      output is a structural zero exactly where no supported element reaches it; a NaN/Inf weight that only
      structural zeros meet is annihilated (the program without those elements never multiplies it).
    - ``weights=()``: no argument holds weights (the other arguments only decide where elements land: indices,
      boxes, grids); the counts run as they are, and an output is structural where its count and its value are
      both 0 (signed weights cancel in a count: a value not 0 is a supported element, +1 and -1).
    - ``weights=None`` (not said): any other floating argument (tensor, number, list of tensors) may hold
      weights. Where one holds a 0 (or a value below the smallest normal of its dtype or the sensitivity's,
      which a kernel's cast or flush makes 0), the counts run a second time with those values as ones and an
      output is structural only where both counts (and its value) are 0. Sound where the zero sits in a weight,
      and where it sits in a box or a grid the second count can only keep more outputs supported (fewer strong
      zeros, never a hidden NaN). Integer weights are not guessed (indices are integers): name them.

    Other float arguments (boxes, grids) are values passed as they are, so a NaN/Inf there makes its outputs'
    counts NaN: those keep the op's value (a NaN that a supported element meets is used; one that only a
    structural zero meets gives PyTorch's NaN, named if the gradients end up non-finite), never a 0 that would
    hide the NaN or drop what the supported elements placed there. A weight computed inside the kernel (the
    bilinear weights of roi_align at an integer sample position) is not an argument: a 0 there counts as no
    reach."""
    slots_of: dict[Any, list[tuple[int, str]]] = {}

    def placement(func, args, kwargs, sup):
        out = func(*args, **kwargs)
        s = sup.of(args[0])
        ones = torch.ones_like(args[0]) if s is None else s.expand(args[0].shape).to(args[0].dtype)
        if weights:
            slots = slots_of.get(func)
            if slots is None:
                slots = slots_of[func] = _weight_slots(func, weights)
            unit_args, unit_kwargs = _with_ones(func, args, kwargs, slots)
            counts = func(ones, *unit_args[1:], **unit_kwargs)
            reach = None
        else:
            counts = func(ones, *args[1:], **kwargs)  # the op's own zeros (rows a scatter never reaches) too
            swapped = _zeros_as_ones(args, kwargs) if weights is None else None
            reach = None if swapped is None else _reach(func, ones, swapped, counts)
        outs, cs = (x if isinstance(x, (tuple, list)) else (x,) for x in (out, counts))
        rs = (reach if isinstance(reach, (tuple, list)) else (reach,)) if reach is not None else (None,) * len(cs)
        for o, c, r in zip(outs, cs, rs, strict=True):
            if not _is_float(o):
                continue
            if weights:  # unit weights: no cancellation, no weight 0
                support = c != 0
            else:
                # != 0, not > 0: a NaN count is no proof of a structural zero. And where the op's value is not 0 a
                # supported element reached the output (a structural one is 0, times a finite weight 0): signed
                # weights that cancel in the count (+1, -1), or a weight 0 meeting a supported Inf (0 x Inf = NaN)
                support = (c != 0) | (o != 0)
                if r is not None:
                    support |= r != 0
            sup.record(_annihilate(o, support), support)
            # a structural element (count 0) meeting a NaN/Inf weight makes a NaN count, never an Inf one (an Inf
            # count is a supported element meeting Inf, or 0/1 counts overflowing a large finite weight)
            if s is not None and bool(c.isnan().any()):
                sup.unfollowed.append((f"{func}, whose placement rule met NaN/Inf among its other arguments",
                                       "make the op's other arguments finite where no kept element reads them"))
        return out

    placement.__doc__ = _placement_rule.__doc__
    placement.__name__ = "_placement"
    return placement


# no argument holds weights: the built-in placements whose weights the kernel computes (segment reductions)
_placement = _placement_rule(())


def _each_output(body: Rule, family: str, factors: int) -> Rule:
    """A pointwise family (``linear``, ``product``: pointwise in the first ``factors`` arguments) for an op that
    may return several tensors (``g * b, g * a``): the body runs once per output, on that output, as it would for
    an op returning it alone. An in-place op (``mul_(g, v)``, returning None) has its first argument as output.
    An output that is not pointwise in those arguments (``(g * x).sum(0)``: their supports do not broadcast to it)
    keeps the op's value, fully supported, named if a structural zero was met and the gradients end up
    non-finite."""

    def pointwise(o: torch.Tensor, args: tuple) -> bool:
        try:
            return all(torch.broadcast_shapes(o.shape, a.shape) == o.shape
                       for a in args[:factors] if isinstance(a, torch.Tensor))
        except RuntimeError:
            return False

    def each(func, args, kwargs, sup, o):
        if pointwise(o, args):
            return body(lambda *_, **__: o, args, kwargs, sup)
        sup.record(o, None)
        if any(map(sup.zeroed, tree_leaves((args, kwargs)))):
            sup.unfollowed.append((f"{func}, whose output of shape {tuple(o.shape)} is not pointwise in its "
                                   f"first argument(s) (rule family {family!r})",
                                   "register a function rule that declares that output's support"))
        return o

    def rule(func, args, kwargs, sup):
        out = func(*args, **kwargs)
        if out is None:  # an in-place op: its result is written into its first argument
            first = func._schema.arguments[0].alias_info if func._schema.arguments else None
            if first is not None and first.is_write and _is_float(args[0]):
                each(func, args, kwargs, sup, args[0])
            return out
        if not isinstance(out, (tuple, list)):
            # (a bool result, mask & mask, goes to the body as before: a selection)
            return each(func, args, kwargs, sup, out) if _is_float(out) else body(lambda *_, **__: out, args,
                                                                                   kwargs, sup)
        return type(out)(each(func, args, kwargs, sup, o) if _is_float(o) else o for o in out)

    rule.__doc__ = body.__doc__
    rule.__name__ = body.__name__
    return rule


FAMILIES: dict[str, Rule] = {
    # pointwise and linear in the first argument: out is a structural zero wherever it is (activation backwards)
    "linear": _each_output(_linear, "linear", 1),
    # pointwise product of the first two arguments: a structural zero of either annihilates the other
    "product": _each_output(_mul, "product", 2),
    "placement": _placement_rule(None),
}


class RuleHandle:
    """Returned by ``register_rule``; ``remove()`` restores what was registered for the op before."""

    def __init__(self, key: Any, previous: Rule | None) -> None:
        self._key, self._previous = key, previous

    def remove(self) -> None:
        if self._previous is None:
            RULES.pop(self._key, None)
        else:
            RULES[self._key] = self._previous


def _key(op: Any) -> Any:
    if isinstance(op, str):
        if "::" not in op:
            raise ValueError(f"gw.register_rule: op name {op!r} needs its namespace, e.g. 'torchvision::roi_align'")
        name = op.split(".")[0] if op.endswith(".default") else op
        ns, _, base = name.partition("::")
        try:  # an op that exists already is keyed by the op itself, as lookup finds the built-in rules first
            packet = getattr(getattr(torch.ops, ns), base)
        except (AttributeError, RuntimeError):
            return name  # a library that loads later: found by its name
        return packet if "." not in base else name
    custom = getattr(op, "_opoverload", None)  # a torch.library.custom_op object
    if custom is not None:
        return custom.overloadpacket
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return op
    raise TypeError(f"gw.register_rule: op must be a torch op (torch.ops.ns.name, a torch.library custom op) or its "
                    f"name 'ns::name', got {type(op).__name__}")


def _existing(key: Any) -> Rule | None:
    """The rule ``lookup`` finds now for a registration key (overload, packet, or name)."""
    if isinstance(key, torch._ops.OpOverload):
        packet = key.overloadpacket
        return RULES.get(key) or RULES.get(packet) or RULES.get(packet._qualified_op_name)
    if isinstance(key, torch._ops.OpOverloadPacket):
        return RULES.get(key) or RULES.get(key._qualified_op_name)
    return RULES.get(key)


def _wrap(rule: RuleFunction) -> Rule:
    def wrapped(func, args, kwargs, sup):
        view = Supports(sup)
        out = rule(func, args, kwargs, view)
        # an output the rule did not declare is taken as fully supported: where an argument held a structural
        # zero, that may have dropped it (a NaN met there stays): named if the gradients end up non-finite
        if any(isinstance(o, torch.Tensor) and _is_float(o) and id(o) not in view.declared
               for o in tree_leaves(out)) \
                and any(map(sup.zeroed, tree_leaves((args, kwargs)))):
            sup.unfollowed.append(f"{func}, whose registered rule {wrapped.__name__} declares no support for an "
                                  "output (supports.set)")
        return out

    wrapped.__doc__ = rule.__doc__
    wrapped.__name__ = getattr(rule, "__name__", "rule")
    return wrapped


def _checked_weights(op: Any, weights: Sequence[str | int]) -> Weights:
    """``weights`` as a tuple, checked against the op's schema where the op is loaded (a name of a library not
    loaded yet is checked when the op first runs)."""
    if isinstance(weights, (str, int)):
        weights = (weights,)
    out = tuple(weights)
    if not all(isinstance(w, (str, int)) and not isinstance(w, bool) for w in out):
        raise TypeError(f"gw.register_rule: weights must name arguments (str) or positions (int), got {weights!r}")
    key = _key(op)
    overloads = [key] if isinstance(key, torch._ops.OpOverload) else \
        [getattr(key, n) for n in key.overloads()] if isinstance(key, torch._ops.OpOverloadPacket) else []
    for overload in overloads:
        _weight_slots(overload, out)
    return out


def register_rule(op: Any, rule: str | RuleFunction, *, replace: bool = False,
                  weights: Sequence[str | int] | None = None) -> RuleHandle:
    """Register how strong zeros pass through ``op`` when it runs inside a backward.

    ``op`` is a torch op (``torch.ops.mylib.my_op``, one overload of it, the object ``torch.library.custom_op``
    returns) or its qualified name (``"torchvision::_roi_align_backward"``: resolved when the op runs, so the
    library need not be loaded yet). ``rule`` is either a family name:

    - ``"linear"``: pointwise, linear in the first argument (an activation's backward ``g * f'(x)``);
    - ``"product"``: pointwise product of the first two arguments;
    - ``"placement"``: a linear map of the first argument with weights fixed by the other arguments (scatter,
      gather, pooling, ROI pooling/align backward). ``weights`` names the arguments (schema names or positions)
      that hold the weights, which may be 0 or negative: a weight 0 multiplies an element the forward read,
      so that element is no structural zero. ``weights=()`` says no argument does (they only decide where
      elements land: indices, boxes); left out, any floating argument holding a 0 (tensor or number) may be
      a weight, and the rule then counts with those zeros as ones too (sound, one more run of the op, fewer
      strong zeros where the zero was a box coordinate); integer weights must be named;

    or a function ``rule(op, args, kwargs, supports) -> output`` that runs ``op(*args, **kwargs)`` itself (on
    whatever it likes: dropping what only structural zeros read, replacing NaN that only they meet) and declares
    the support of each floating output with ``supports.set(out, support)``; ``supports.of(t)`` gives an
    argument's support. A structural zero must stay 0 whatever the values it multiplies hold, and an element the
    output may depend on must stay supported, or gradients become wrong. An output the rule does not declare
    counts as fully supported; where an argument held a structural zero, a ``gw.OpaqueBackwardWarning`` names
    the rule if the gradients end up holding NaN/Inf.

    Returns a handle whose ``remove()`` undoes the registration. A built-in rule is replaced only with
    ``replace=True``. ``weights`` applies to ``"placement"`` only.

    >>> import torch, gradwise as gw
    >>> @torch.library.custom_op("doc::double_backward", mutates_args=())
    ... def double_backward(g: torch.Tensor) -> torch.Tensor:
    ...     return 2 * g
    >>> handle = gw.register_rule(double_backward, "linear")
    >>> handle.remove()
    """
    if weights is not None and rule != "placement":
        raise ValueError(f"gw.register_rule: weights= applies to the 'placement' family only, not to {rule!r}")
    if isinstance(rule, str):
        if rule not in FAMILIES:
            raise ValueError(f"gw.register_rule: unknown rule family {rule!r}; use one of {sorted(FAMILIES)} or a "
                             f"function rule(op, args, kwargs, supports)")
        body = FAMILIES[rule] if weights is None else _placement_rule(_checked_weights(op, weights))
    elif callable(rule):
        body = _wrap(rule)
    else:
        raise TypeError(f"gw.register_rule: rule must be a family name or a function, got {type(rule).__name__}")
    key = _key(op)
    previous = RULES.get(key)
    existing = _existing(key)  # what lookup would use for it: an overload's packet's rule counts too
    if existing is not None and not replace:
        raise ValueError(f"gw.register_rule: {key} already has a strong-zero rule ({existing.__name__}); pass "
                         f"replace=True to override it")
    RULES[key] = body
    return RuleHandle(key, previous)


# Library ops whose backward is a placement of the sensitivity (their packages are optional): ROI pooling and
# align move each output bin's gradient onto the input pixels it sampled, with non-negative bilinear (or max)
# weights, so an input pixel no kept box samples gets a structural zero and the backbone's NaN there never meets
# it. tests/test_custom_rules.py runs them on torchvision's kernels where it loads (0.29 beside torch 2.14), and
# the roi_align rule on a pure-PyTorch op with torchvision's schema where it does not (torch 2.13).
for _name in ("torchvision::_roi_align_backward", "torchvision::_roi_pool_backward",
              "torchvision::_ps_roi_align_backward", "torchvision::_ps_roi_pool_backward"):
    RULES.setdefault(_name, _placement)  # weights computed inside the kernel from the boxes: weights=()
