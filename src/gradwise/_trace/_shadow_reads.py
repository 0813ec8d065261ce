"""``_ShadowReads``: what the trace asks of the strong-zero pass run beside a backward (``_Shadow``): where an op's
structural zeros annihilate a NaN/Inf carried to it, where strong zeros keep one made here, which part of a saved
operand makes an element non-finite by itself; and ``carried``, what a sensitivity's NaN/Inf reaches through an
op, and ``rerunnable``, which ops may be run again at all.

May import: torch, gradwise._strong_zeros, gradwise._trace._facts.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

from gradwise import _strong_zeros
from gradwise._trace._facts import WORKSPACE_READERS


class _ShadowReads:
    """The questions the trace asks of a shadow pass (a part of ``_Shadow``)."""

    def annihilated(self, func, args, kwargs, sens, o, out) -> torch.Tensor | None:
        """Bool over ``o``: where this op's structural zeros annihilate a NaN/Inf that strong zeros carry to it in
        a sensitivity of ``sens`` (genuine upstream): PyTorch's op makes it non-finite from the shadows of its
        arguments, and finite once those NaN/Inf are zeros, and the rules leave it finite. A NaN/Inf the real
        backward carries there that strong zeros removed upstream (contamination), or that this op makes itself
        (0/0 where a structural zero meets a zero), is no annihilation of a carried one. None where not known (an
        in-place op: running it would write the shadows)."""
        strong = self.strong(o)
        if strong is None or not rerunnable(func) or func._schema.is_mutable:
            return None
        if all(bool(torch.isfinite(self.get(t)).all()) for t in sens if _inexact(t)):
            return torch.zeros(o.shape, dtype=torch.bool, device=o.device)

        def arg(a, zeroed):
            # the sensitivities' shadows (their NaN/Inf zeros: ``zeroed``); other values made finite (a saved NaN
            # meeting a structural zero here is the real backward's contamination, carried from where it was
            # classified)
            t = self.get(a)
            if not isinstance(t, torch.Tensor) or not _inexact(t) or bool(torch.isfinite(t).all()):
                return t
            if any(a is s for s in sens) and not zeroed:
                return t
            return torch.nan_to_num(t, 0.0, 0.0, 0.0)

        at = next((i for i, t in enumerate(tree_flatten(out)[0]) if t is o), None)
        made = []
        for zeroed in (False, True):
            try:
                res = func(*tree_map(lambda a, z=zeroed: arg(a, z), args),
                           **tree_map(lambda a, z=zeroed: arg(a, z), kwargs))
            except Exception:  # an explanation must never break the program it explains
                return None
            flat = tree_flatten(res)[0]
            p = flat[at] if at is not None and at < len(flat) else None
            if not isinstance(p, torch.Tensor) or p.shape != o.shape:
                return None
            made.append(torch.isfinite(p))
        met = self._structural_met(sens, strong) if torch.Tag.pointwise in func.tags else False
        return (~made[0] & made[1] | met) & torch.isfinite(strong)

    def _structural_met(self, sens, strong: torch.Tensor) -> torch.Tensor:
        """Bool over ``strong``, the output of a pointwise op: where a rule recorded a structural zero (its support
        False) that a NaN/Inf of a sensitivity's shadow meets, element by element. The reruns above make other
        non-finite operands 0, which a structural zero that is itself a saved Inf cannot survive: logaddexp's
        weight ``g / (1 + exp(b - a))`` of a -inf argument, whose denominator is +inf
        (``gradwise._ops._zeros.LOG_SPACE_SUMS``)."""
        met = torch.zeros(strong.shape, dtype=torch.bool, device=strong.device)
        support = self.mode.supports.of(strong)
        if support is None:
            return met
        for t in sens:
            s = self.get(t)
            if isinstance(s, torch.Tensor) and _inexact(s) and _broadcasts(s.shape, strong.shape):
                met |= ~torch.isfinite(s).broadcast_to(strong.shape)
        return met & ~support.expand(strong.shape)

    def kept_here(self, func, args, kwargs, upstream, o, out) -> torch.Tensor | None:
        """Bool over ``o``: where strong zeros hold a NaN/Inf that no NaN/Inf of the sensitivities ``upstream``
        reaches (in their shadows): made here, from a saved value a nonzero sensitivity meets. None where not
        known."""
        strong = self.strong(o)
        if strong is None:
            return None
        reached = carried(func, tree_map(self.get, args), tree_map(self.get, kwargs),
                          [self.get(u) for u in upstream], o, out)
        return None if reached is None else ~torch.isfinite(strong) & ~reached

    def kept_of_part(self, func, args, kwargs, t: torch.Tensor, part: torch.Tensor, o, out) -> torch.Tensor | None:
        """Bool over ``o``: where strong zeros hold a NaN/Inf when, of the non-finite values in this op's operands,
        only those of the saved ``t`` at ``part`` remain (every other one, the sensitivities' shadows' included,
        made 0, their supports kept): the elements that part alone makes non-finite under the rules. A part met
        by a zero the program computed (tanh'(inf) = 0 x inf) is kept, one met by a structural zero (a padding
        row below a slice) is not, whatever NaN of another part covers the same elements. None where not known."""
        return self.kept_of_parts(func, args, kwargs, {id(t): part}, o, out, plain=t)

    def kept_of_parts(self, func, args, kwargs, keep: dict, o, out, plain=None) -> torch.Tensor | None:
        """``kept_of_part`` with several kept at once: ``keep`` maps an argument's id to the elements whose NaN/Inf
        stay (of its shadow: a sensitivity's NaN/Inf that strong zeros hold), every other NaN/Inf made 0 (``plain``:
        an argument kept as it is, not its shadow). One birth's NaN/Inf can sit in several operands (a saved input,
        the saved output made of it, the sensitivity it made upstream: cdist's backward, inf / inf), none of which
        makes NaN by itself."""
        if self.strong(o) is None or not rerunnable(func) or func._schema.is_mutable:
            return None
        supports = self.mode.supports

        def arg(a):
            if plain is not None and a is plain:
                return torch.where(keep[id(a)].broadcast_to(a.shape) | torch.isfinite(a), a, 0.0)
            s = self.get(a)
            if not isinstance(s, torch.Tensor) or not _inexact(s) or bool(torch.isfinite(s).all()):
                return s
            part = keep.get(id(a)) if isinstance(a, torch.Tensor) else None
            z = torch.nan_to_num(s, 0.0, 0.0, 0.0) if part is None else \
                torch.where(part.broadcast_to(s.shape) | torch.isfinite(s), s, 0.0)
            support = supports.of(s)
            if support is not None:
                supports.record(z, support.clone(), fresh=True)
            return z

        at = next((i for i, r in enumerate(tree_flatten(out)[0]) if r is o), None)
        try:
            # (the arguments made outside the strong mode: there the where's zeros at the other parts were
            # structural zeros of ``t``, two tracked operands the bilinear rule runs plainly, 0 x NaN at a padding
            # part a structural zero meets: a Conv1d's padding batch elements "kept by strong zeros", genuine)
            with torch.no_grad():
                new_args, new_kwargs = tree_map(arg, args), tree_map(arg, kwargs)
            with torch.no_grad(), self.mode:
                res = func(*new_args, **new_kwargs)
        except Exception:  # an explanation must never break the program it explains
            return None
        flat = tree_flatten(res)[0]
        p = flat[at] if at is not None and at < len(flat) else None
        return ~torch.isfinite(p) if isinstance(p, torch.Tensor) and p.shape == o.shape else None


def carried(func, args, kwargs, upstream, o, out) -> torch.Tensor | None:
    """Bool over ``o``: the elements a NaN/Inf of the sensitivities ``upstream`` reaches through ``func`` (the op
    run again with every other non-finite value made 0); the rest of a non-finite ``o`` is a saved NaN/Inf met here.
    None where it cannot tell (an in-place op, or a failure)."""
    if not rerunnable(func) or func._schema.is_mutable:
        return None

    def arg(a):
        if not isinstance(a, torch.Tensor) or not _inexact(a) or any(a is u for u in upstream) \
                or bool(torch.isfinite(a).all()):
            return a
        return torch.nan_to_num(a, 0.0, 0.0, 0.0)

    try:
        if func.overloadpacket in WORKSPACE_READERS:
            # (its workspace holds the forward's NaN/Inf, which no 0 replaces: the rule recomputes the layer from its
            # inputs; the sensitivities' zeros taken as structural, their NaN/Inf reach what they reach)
            mode = _strong_zeros._StrongZeroMode(of_pass=False)
            for u in upstream:
                mode.supports.record(u, u != 0)
            with torch.no_grad(), mode:
                res = func(*tree_map(arg, args), **tree_map(arg, kwargs))
        else:
            res = func(*tree_map(arg, args), **tree_map(arg, kwargs))
    except Exception:  # an explanation must never break the program it explains
        return None
    at = next((i for i, t in enumerate(tree_flatten(out)[0]) if t is o), None)
    flat = tree_flatten(res)[0]
    p = flat[at] if at is not None and at < len(flat) else None
    return ~torch.isfinite(p) if isinstance(p, torch.Tensor) and p.shape == o.shape else None


# namespaces whose ops' schemas say every tensor they write (aten's and prims' kernels are checked against them)
_TRUSTED = frozenset({"aten", "prims"})


def rerunnable(func) -> bool:
    """Whether the trace may run ``func`` again for an explanation: an op of a namespace whose schemas declare
    every write. A custom op's may not (FSDP2's fsdp::all_gather_copy_in fills its ``all_gather_output`` argument
    under a schema that writes nothing: a rerun on a shadow buffer then left the real one's shadow uninitialised,
    and the rerun of fsdp::split_with_sizes_copy copied it into the real unsharded parameters), and an op with
    effects of its own (profiler::_record_function_enter_new) would repeat them."""
    return getattr(func, "namespace", None) in _TRUSTED


def _broadcasts(shape, to) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``to`` (its elements then line up with those of ``to``)."""
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


def _inexact(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.layout == torch.strided
