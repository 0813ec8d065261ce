"""``_Shadow``: gw.strong_zeros()' pass run beside a traced backward that may meet NaN/Inf, so that the trace
classifies contamination and genuine by the strong-zero rules' own structural supports, not by values.

A zero sensitivity is structural only where a backward formula made it (a slice's padding, a where's unselected
branch, relu's dead units) and carried it through ops that keep it one; a zero the program computes (sqrt'(inf),
-1/inf**2, 0 * w) is an ordinary zero, and 0 x NaN = NaN there is genuine. Values cannot tell the two apart, so
each backward op the trace sees also runs under ``_StrongZeroMode`` on the *shadows* of its arguments (what the
strong pass holds where the real backward holds them), with one support table for the whole backward: where the
real result is non-finite, the shadow says what strong zeros leave (genuine) and what they annihilate
(contamination).

Cost: only on a backward whose step's forward met a NaN/Inf or a singular point (``_Tracer.dirty``); elsewhere the
trace keeps no shadow and pays one attribute test per backward op. A checkpoint's recomputed forward is passed
over (forward values are their own shadows, ``_forward_again``). A backward that runs ops with grad enabled
(create_graph), meets an operand strong zeros cannot follow (sparse, mkldnn, nested:
they keep its NaN, which the trace tells as contamination they cannot remove), an op outside aten/prims on
tensors (its schema may not declare its writes: ``rerunnable``) or whose rerun fails gives up its
shadow (``valid``): the trace then decides by its value heuristics, as for a NaN/Inf made in a backward whose
forward was finite (an overflow).

May import: torch, gradwise._strong_zeros, gradwise._trace._facts.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _strong_zeros
from gradwise._strong_zeros import _contract
from gradwise._strong_zeros._triangles import TRIANGLE_READERS
from gradwise._trace._facts import WORKSPACE_READERS


class _Shadow:
    """The strong-zero counterpart of one traced backward call: real tensor -> shadow (weakly, by the real one)."""

    def __init__(self, triangles_only: bool = False) -> None:
        self.triangles_only = triangles_only  # follows the nodes of TRIANGLE_READERS only (``unused_triangle``)
        self.mode = _strong_zeros._StrongZeroMode(of_pass=False)  # (beside: no pass state to carry)
        self.of = WeakTensorKeyDictionary()
        self.valid = True
        # (sequence number, saved input, the input the forward read) of the node of TRIANGLE_READERS running now
        # whose unused triangle holds NaN/Inf; its second item None where it holds none
        self.triangle: tuple | None = None

    def get(self, t):
        """The shadow of ``t`` (``t`` itself where the backward has not made it: a saved forward value, a seed;
        in a node of ``TRIANGLE_READERS``, its saved input is read as the strong pass reads it: ``unused_triangle``)."""
        if not isinstance(t, torch.Tensor):
            return t
        s = self.of.get(t)
        if s is None and self.triangle is not None and t is self.triangle[1]:
            return self.triangle[2]
        return t if s is None else s

    def unused_triangle(self, node) -> bool:
        """Whether ``node`` (the autograd node running now) reads NaN/Inf in a triangle of its saved input that its
        forward never read (``_strong_zeros._triangles.TRIANGLE_READERS``, the strong pass's fact): then its ops run
        beside on that input as the strong pass evaluates the formula, the unused triangle 0 (mirrored for pinv)."""
        if node is None or type(node).__name__ not in TRIANGLE_READERS:
            self.triangle = None
            return False
        seq = node._sequence_nr()
        if self.triangle is None or self.triangle[0] != seq:
            attr, _, read, _ = TRIANGLE_READERS[type(node).__name__]
            self.triangle = (seq, None, None)
            try:
                factor = getattr(node, attr)
                used = read(node, factor)
            except RuntimeError:  # freed (retain_graph=False, a second call), or unpacked through a hook
                return False
            if used is not None:
                self.triangle = (seq, factor, torch.where(used[2], used[0], factor))
        return self.triangle[1] is not None

    def strong(self, o: torch.Tensor) -> torch.Tensor | None:
        """What gw.strong_zeros()' pass holds where the backward holds ``o``; None where it is not known."""
        if not self.valid:
            return None
        s = self.of.get(o)
        return s if s is not None and s.shape == o.shape else None

    def before(self, func, args, kwargs) -> None:
        """Ahead of an in-place op: a written argument without a shadow gets a copy of its own, so the rerun
        writes that copy (never the program's tensor) and starts from the value the real op started from."""
        if not self.valid or (torch.is_grad_enabled() and _forward_again()):
            return
        try:
            for t in _written(func, args, kwargs):
                for w in _flat_tensors(t):  # (an ``out=`` list: Tensor(a!)[])
                    if w not in self.of:
                        self.of[w] = self._copy(w)
        except Exception:  # an explanation must never break the program it explains
            self.valid = False

    def run(self, func, args, kwargs, out, outputs_finite: bool) -> None:
        """Run ``func`` under the strong-zero rules on the shadows of ``args``; map each real output to its
        shadow. The strong pass's own ops (under gw.strong_zeros()) are their own shadows."""
        if not self.valid:
            return
        if not rerunnable(func):
            # its schema may not say what it writes (fsdp::all_gather_copy_in fills its buffer argument), or it
            # has effects of its own (a profiler range): not run again; one that touches tensors ends the shadow
            if _flat_tensors((args, kwargs, out)):
                self.valid = False
            return
        if torch.is_grad_enabled() and _forward_again():
            return  # a checkpoint's recomputed forward: its values are forward values, their own shadows
        if torch.is_grad_enabled() or _contract.unfollowed(args):
            # create_graph, grad enabled by user code in a hook, a sparse/mkldnn/nested operand (strong zeros run
            # it as PyTorch does and drop its supports): not followed, the trace decides by values
            self.valid = False
            return
        state = _strong_zeros._STATE
        # gw.strong_zeros()' own pass is its own shadow, but where a node's formula reads an unused triangle: its
        # post-hook replaces the node's result, and the ops before it are followed plainly on the input it reads
        triangle = self.unused_triangle(torch._C._current_autograd_node())
        plain = _strong_zeros.in_pass() or self.triangles_only  # (on any engine thread)
        if plain and not triangle:
            return
        finite, state.outputs_finite = state.outputs_finite, outputs_finite
        try:
            shadow_args = tree_map(self.get, args)
            shadow_kwargs = tree_map(self.get, kwargs)
            if func._schema.is_mutable and _writes_program(func, args, kwargs, shadow_args, shadow_kwargs):
                self.valid = False  # the rerun would write the program's own tensor
                return
            if plain:
                res = func(*shadow_args, **shadow_kwargs)
            else:
                with self.mode:
                    res = func(*shadow_args, **shadow_kwargs)
            real, _ = tree_flatten(out)
            strong, _ = tree_flatten(res)
            for r, s in zip(real, strong, strict=False):
                if isinstance(r, torch.Tensor) and isinstance(s, torch.Tensor) and r is not s:
                    self.of[r] = s
        except Exception:  # an explanation must never break the program it explains: decided by values instead
            self.valid = False
        finally:
            state.outputs_finite = finite


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

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """A shadow for ``t`` laid out as ``t``: the same view of its base's shadow (or of a copy of the base), so
        that writes through either reach the other as they do in the program."""
        base = t._base if t._base is not None else t
        if base.layout != torch.strided:
            return t.clone()
        whole = self.of.get(base)
        if whole is None or whole.shape != base.shape or whole.stride() != base.stride():
            whole = torch.empty_strided(base.size(), base.stride(), dtype=base.dtype, device=base.device)
            whole.copy_(base)
            if base is not t:
                self.of[base] = whole
        if base is t:
            return whole
        return whole.as_strided(t.size(), t.stride(), whole.storage_offset() + t.storage_offset()
                                - base.storage_offset())


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


def _forward_again() -> bool:
    """Is a checkpoint running the user's forward again inside this backward (non-reentrant: its recomputation,
    which the strong pass runs outside its mode; reentrant: under its node, grad on)? Its ops read and make
    forward values, which are their own shadows: the shadow passes over them (once it gave up there, and with it
    every classification below a checkpointed block: contamination claimed beside a genuine NaN that covers it)."""
    if _strong_zeros._STATE.checkpoint_forward:
        return True
    node = torch._C._current_autograd_node()
    return node is not None and torch.is_grad_enabled() and node.name() == "CheckpointFunctionBackward"


def _flat_tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _written(func, args, kwargs):
    """The arguments the op's schema says it writes (a tensor, or a list of them), in schema order."""
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            yield args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)


def _writes_program(func, args, kwargs, shadow_args, shadow_kwargs) -> bool:
    """Whether running the in-place op ``func`` on the shadows would write a tensor of the program (a written
    argument whose shadow is the tensor itself: ``before`` could not give it one)."""
    pairs = zip(_written(func, args, kwargs), _written(func, shadow_args, shadow_kwargs), strict=True)
    return any(r is s for real, shadow in pairs for r, s in zip(_flat_tensors(real), _flat_tensors(shadow),
                                                                 strict=False))


def _broadcasts(shape, to) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``to`` (its elements then line up with those of ``to``)."""
    try:
        return torch.broadcast_shapes(shape, to) == to
    except RuntimeError:
        return False


def _inexact(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.layout == torch.strided
