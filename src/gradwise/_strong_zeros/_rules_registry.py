"""Public registration of strong-zero rules for ops gradwise does not know: ``torch.library`` custom ops, C++
extension ops (torchvision, torchaudio, your own).

An op without a rule that meets a structural zero in a backward runs as plain PyTorch with its outputs treated
as fully supported (listed by ``gw.unruled_ops()``): a NaN it multiplies by a zero may remain, never a wrong
finite number. ``register_rule`` tells gradwise how supports pass through such an op, usually the op that
computes a custom op's backward. See docs/nan-sources.md ("Rules for your own ops").

May import: torch, _rules, _rules_pointwise.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _placement(func, args, kwargs, sup):
    """The op is a linear map of its first argument (the sensitivity) with non-negative weights that depend on
    the other arguments only: a scatter, a gather, a pooling or ROI pooling/align backward. It runs again on the
    sensitivity's support as 0/1 numbers; an output no supported element reaches (count 0) is a structural
    zero. Other float arguments (boxes, grids, weights) are values and are passed as they are, so a NaN/Inf
    weight makes its outputs' counts NaN: those keep the op's value (a weight that a supported element meets is
    used: its NaN is genuine; one that only a structural zero meets gives PyTorch's NaN, named if the gradients
    end up non-finite), never a 0 that would hide the NaN or drop what the supported elements placed there."""
    out = func(*args, **kwargs)
    s = sup.of(args[0])
    ones = torch.ones_like(args[0]) if s is None else s.expand(args[0].shape).to(args[0].dtype)
    counts = func(ones, *args[1:], **kwargs)  # the op's own zeros (rows a scatter never reaches) are structural
    for o, c in zip(*(x if isinstance(x, (tuple, list)) else (x,) for x in (out, counts)), strict=True):
        if _is_float(o):
            # != 0, not > 0: a NaN count is no proof of a structural zero. And where the op's value is not 0 a
            # supported element reached the output (a structural one is 0, times a finite weight 0): signed
            # weights that cancel in the count (+1, -1), or a weight 0 meeting a supported Inf (0 x Inf = NaN)
            support = (c != 0) | (o != 0)
            sup.record(_annihilate(o, support), support)
            # a structural element (count 0) meeting a NaN/Inf weight makes a NaN count, never an Inf one (an Inf
            # count is a supported element meeting Inf, or 0/1 counts overflowing a large finite weight)
            if s is not None and bool(c.isnan().any()):
                sup.unfollowed.append((f"{func}, whose placement rule met NaN/Inf among its other arguments",
                                       "make the op's other arguments finite where no kept element reads them"))
    return out


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
    "placement": _placement,
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


def register_rule(op: Any, rule: str | RuleFunction, *, replace: bool = False) -> RuleHandle:
    """Register how strong zeros pass through ``op`` when it runs inside a backward.

    ``op`` is a torch op (``torch.ops.mylib.my_op``, one overload of it, the object ``torch.library.custom_op``
    returns) or its qualified name (``"torchvision::_roi_align_backward"``: resolved when the op runs, so the
    library need not be loaded yet). ``rule`` is either a family name:

    - ``"linear"``: pointwise, linear in the first argument (an activation's backward ``g * f'(x)``);
    - ``"product"``: pointwise product of the first two arguments;
    - ``"placement"``: a linear map of the first argument with non-negative weights fixed by the other arguments
      (scatter, gather, pooling, ROI pooling/align backward);

    or a function ``rule(op, args, kwargs, supports) -> output`` that runs ``op(*args, **kwargs)`` itself (on
    whatever it likes: dropping what only structural zeros read, replacing NaN that only they meet) and declares
    the support of each floating output with ``supports.set(out, support)``; ``supports.of(t)`` gives an
    argument's support. A structural zero must stay 0 whatever the values it multiplies hold, and an element the
    output may depend on must stay supported, or gradients become wrong. An output the rule does not declare
    counts as fully supported; where an argument held a structural zero, a ``gw.OpaqueBackwardWarning`` names
    the rule if the gradients end up holding NaN/Inf.

    Returns a handle whose ``remove()`` undoes the registration. A built-in rule is replaced only with
    ``replace=True``.

    >>> import torch, gradwise as gw
    >>> @torch.library.custom_op("doc::double_backward", mutates_args=())
    ... def double_backward(g: torch.Tensor) -> torch.Tensor:
    ...     return 2 * g
    >>> handle = gw.register_rule(double_backward, "linear")
    >>> handle.remove()
    """
    if isinstance(rule, str):
        if rule not in FAMILIES:
            raise ValueError(f"gw.register_rule: unknown rule family {rule!r}; use one of {sorted(FAMILIES)} or a "
                             f"function rule(op, args, kwargs, supports)")
        body = FAMILIES[rule]
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
# it. Not tested against the real kernels here: torchvision does not load beside this torch (see
# tests/test_custom_rules.py, which runs the same rule on a pure-PyTorch op with torchvision's schema).
for _name in ("torchvision::_roi_align_backward", "torchvision::_roi_pool_backward",
              "torchvision::_ps_roi_align_backward", "torchvision::_ps_roi_pool_backward"):
    RULES.setdefault(_name, _placement)
