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

May import: torch, gradwise._masks, gradwise._ops, gradwise._strong_zeros, gradwise._trace._shadow_reads (the
questions the trace asks of it).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _strong_zeros
from gradwise._masks import mask_any
from gradwise._ops._zeros import NAN_DISCARDS
from gradwise._strong_zeros import _contract
from gradwise._strong_zeros._rules import _hooked
from gradwise._strong_zeros._triangles import TRIANGLE_READERS
from gradwise._trace._shadow_reads import _ShadowReads, rerunnable

_NAN_DISCARD_NODES = {node for node, _ in NAN_DISCARDS.values()}


class _Shadow(_ShadowReads):
    """The strong-zero counterpart of one traced backward call: real tensor -> shadow (weakly, by the real one)."""

    def __init__(self, triangles_only: bool = False) -> None:
        self.triangles_only = triangles_only  # follows the nodes of TRIANGLE_READERS only (``unused_triangle``)
        self.mode = _strong_zeros._StrongZeroMode(of_pass=False)  # (beside: no pass state to carry)
        self.of = WeakTensorKeyDictionary()
        self.valid = True
        self.discarding = False  # follow_discard met an fmax/fmin that ignored a NaN: it follows what they made
        # (not reset per backward, _beside's: a later one follows only ops on live shadowed tensors, a seed or .grad)
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

    def follow_discard(self, node, func, args, kwargs, out, outputs_finite) -> None:
        """Without a valid shadow of the whole backward (its forward met no NaN/Inf, a step begun again by an op
        after an earlier backward, create_graph): the ops of an fmax/fmin node one of whose operands is a lone NaN
        (``NAN_DISCARDS``: the op ignored it), and every later op on what they made, run beside under the
        strong-zero rules, so that the sensitivity sent to the ignored NaN is the structural zero it is for gw.grad.
        torch 2.14's formula passes it the whole gradient, and the trace's value heuristics then called the NaN of
        sqrt(-1) below fmax(0, .) genuine (2.13's formula fills it with a zero). ``outputs_finite``: the tracer's
        (called only where an op is followed)."""
        if not self.valid or _strong_zeros.in_pass() or (torch.is_grad_enabled() and _forward_again()):
            # (a checkpoint's recomputed forward, run while the fmax node unpacks its saved tensors: forward values,
            # their own shadows; a rerun of its random ops drew again and changed what the recomputation drew)
            return
        if _ignores_nan(node):
            self.discarding = True
        elif not (self.discarding and any(t in self.of for t in _flat_tensors(args))):
            return
        if not rerunnable(func) or torch.Tag.nondeterministic_seeded in func.tags or _contract.unfollowed(args):
            # an op it cannot run again, or one that draws random numbers (a hook's rand_like: a rerun draws again,
            # and the program's generator moves): what reads the shadows after it is unknown. (An in-place write is
            # followed on a tensor with a shadow of its own: torch 2.13's formula writes its mask with logical_or_)
            self.valid = False
            return
        self._rerun(func, args, kwargs, out, outputs_finite, strong=True)

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
        # gw.strong_zeros()' own pass is its own shadow, but where a node's formula reads an unused triangle: its
        # post-hook replaces the node's result, and the ops before it are followed plainly on the input it reads
        triangle = self.unused_triangle(torch._C._current_autograd_node())
        plain = _strong_zeros.in_pass() or self.triangles_only  # (on any engine thread)
        if plain and not triangle:
            return
        self._rerun(func, args, kwargs, out, lambda: outputs_finite, strong=not plain)

    def _rerun(self, func, args, kwargs, out, outputs_finite, strong: bool) -> None:
        """Run ``func`` on the shadows of ``args`` (under the strong-zero rules where ``strong``) with strong zeros'
        ``outputs_finite`` set to the tracer's (``outputs_finite()``), and map each real output to the output of the
        rerun (its shadow); an in-place write to a tensor of the program (one without a shadow of its own) is not
        run, and ends the shadow."""
        state = _strong_zeros._STATE
        finite = state.outputs_finite
        try:
            shadow_args = tree_map(self.get, args)
            shadow_kwargs = tree_map(self.get, kwargs)
            if func._schema.is_mutable and _writes_program(func, args, kwargs, shadow_args, shadow_kwargs):
                self.valid = False  # the rerun would write the program's own tensor
                return
            state.outputs_finite = outputs_finite()
            with torch.no_grad(), self.mode if strong else contextlib.nullcontext():  # (create_graph: values only)
                res = func(*shadow_args, **shadow_kwargs)
            for r, s in zip(tree_flatten(out)[0], tree_flatten(res)[0], strict=False):
                if isinstance(r, torch.Tensor) and isinstance(s, torch.Tensor) and r is not s:
                    self.of[r] = s
        except Exception:  # an explanation must never break the program it explains: decided by values instead
            self.valid = False
        finally:
            state.outputs_finite = finite

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


def _forward_again() -> bool:
    """Is a checkpoint running the user's forward again inside this backward (non-reentrant: its recomputation,
    which the strong pass runs outside its mode; reentrant: under its node, grad on)? Its ops read and make
    forward values, which are their own shadows: the shadow passes over them (once it gave up there, and with it
    every classification below a checkpointed block: contamination claimed beside a genuine NaN that covers it)."""
    if _strong_zeros._STATE.checkpoint_forward:
        return True
    node = torch._C._current_autograd_node()
    return node is not None and torch.is_grad_enabled() and node.name() == "CheckpointFunctionBackward"


def _ignores_nan(node) -> bool:
    """Is ``node`` the backward of an fmax/fmin one of whose operands is NaN where the other is not (saved tensors
    that unpack through a hook: assumed so)?"""
    if node is None or type(node).__name__ not in _NAN_DISCARD_NODES:
        return False
    if _hooked(node, "_raw_saved_self", "_raw_saved_other"):
        return True
    try:
        a, b = node._saved_self, node._saved_other
    except RuntimeError:  # freed by an earlier backward
        return False
    return bool(mask_any(a.isnan() ^ b.isnan()))


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
