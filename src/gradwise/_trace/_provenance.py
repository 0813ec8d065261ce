"""``_Provenance``: the part of the tracer that records where a NaN/Inf was born (``_Birth``) and carries
that provenance along forward ops (the leaves it reaches are named by ``_leaf_names``).

May import: torch, gradwise._trace._common, _advice, _facts, _incidents, _kinds, _origins, _parts, _replay,
_row_parts, _store.
"""

from __future__ import annotations

import functools
import sys

import torch

from gradwise._masks import mask_any
from gradwise._trace._advice import _explain
from gradwise._trace._common import (
    _ACCUMULATE_SEQ,
    SCRIPTED,
    TORCHSCRIPT,
    _aligned,
    _has_nan,
    _loc,
    _nan_in,
    _nan_mask,
    _Node,
    _nonfinite,
    _nonfinite_mask,
    _op_name,
    _user_frame,
    engine_hook,
    in_torchscript,
    nonfinite_number,
    pointwise,
    torchscript_node,
)
from gradwise._trace._facts import (
    _ACCUMULATES,
    _BILINEAR,
    _LITERALS,
    _NAN_OF_FULL_ROWS,
    _ROWWISE,
    _SELECTED_COPIES,
    _SELECTED_WRITES,
    _TIES_COUNTED,
)
from gradwise._trace._incidents import _in_base
from gradwise._trace._kinds import readable
from gradwise._trace._origins import _Origins
from gradwise._trace._parts import _Parts, _probed_parts, _written_by, read_inputs
from gradwise._trace._probes import probes
from gradwise._trace._row_parts import _row_dims, _schema_arg, _united
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident
from gradwise._trace._store import count as _count
from gradwise._trace._store import first as _first

# ops that select or move elements (the op run on a part's mask is where they went): the parts they keep are the
# provenance of their output
_SELECTS = {torch.ops.aten.index, torch.ops.aten.index_select, torch.ops.aten.masked_select, torch.ops.aten.gather,
            torch.ops.aten.take, torch.ops.aten.slice, torch.ops.aten.select, torch.ops.aten.narrow,
            torch.ops.aten.roll, torch.ops.aten.flip, torch.ops.aten.repeat,
            torch.ops.aten._unsafe_view,  # (matmul's reshape of its bmm/mm output: no view by schema)
            torch.ops.aten.unsafe_split, torch.ops.aten.unsafe_split_with_sizes,  # (a GRU's gates: views as well)
            torch.ops.aten.unsafe_chunk}
_BORN_PER_NODE = 4  # births per node whose used elements its backward tells (the outputs of one op)
# scans: an output element reads the input's elements up to it along the dim
_SCANS = {torch.ops.aten.cumsum, torch.ops.aten.cumprod, torch.ops.aten.logcumsumexp, torch.ops.aten.cummax,
          torch.ops.aten.cummin}
_SCANS_IN_PLACE = {torch.ops.aten.cumsum_, torch.ops.aten.cumprod_}  # (their parts: the scan of the parts they had)
# ops that place whole inputs side by side: each input's parts go where the op puts that input
_JOINS = {torch.ops.aten.cat, torch.ops.aten.stack}
# ops whose output holds the input's elements where they were: its parts stay (autograd's detach of a saved output)
_SAME_ELEMENTS = {torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten.clone, torch.ops.aten._to_copy}

# softmaxes that make 0 of a -inf input (scaled_dot_product_attention's math path uses _safe_softmax, which makes
# 0 of a fully masked row too; log_softmax keeps -inf, and its births with it)
_MASKING_SOFTMAX = {torch.ops.aten._softmax, torch.ops.aten._safe_softmax}


def _is_view(func) -> bool:
    """Whether ``func`` returns a view of its first argument (squeeze, reshape's view, transpose, expand...): the
    same view of each part's mask is where that part's elements went."""
    first = func._schema.arguments[0] if func._schema.arguments else None
    return first is not None and first.alias_info is not None and not first.alias_info.is_write


def _fresh(func, o: torch.Tensor, mask: torch.Tensor, nf: list, args, ins, clean: bool) -> tuple:
    """Of an elementwise op with non-finite inputs: (the elements of ``o`` non-finite where every input is finite,
    made here, or None where there are none; whether the op writes a non-finite constant: a NaN/Inf number, a 0-dim
    tensor of no known birth). Made here only by such a constant (masked_fill(m, -inf)) or of ``clean`` inputs
    (``_clean``: 0 ** -1 beside an input's Inf was told as that Inf's, the pow named nowhere): a finite input there
    may descend from the NaN/Inf (log of the 0 that x / inf made is the overflow's, not a log(0) of its own)."""
    constant = nonfinite_number(args or ()) is not None or any(
        t.dim() == 0 and not any(t is u for u in nf) and _nonfinite(t) for t in ins)
    if not (constant or clean) or not pointwise(func) or not _aligned(nf, o.shape):
        return None, constant
    fresh = mask.clone()
    for t in nf:
        fresh &= torch.isfinite(t).broadcast_to(o.shape)
    return (fresh if bool(fresh.any()) else None), constant


def _running_stats(func, args) -> tuple:
    """The running statistics a batch norm in training mode writes (``running_mean``, ``running_var``): outputs,
    not inputs. Read as inputs after the op wrote them NaN, they were data that "arrived with NaN", a second
    genuine finding (reaching no gradient) beside the batch's padding NaN that made them so."""
    if not args or not any(a.name == "running_mean" for a in func._schema.arguments) or \
            not _schema_arg(func, args, "training", False):
        return ()
    return tuple(t for name in ("running_mean", "running_var")
                 if isinstance(t := _schema_arg(func, args, name, None), torch.Tensor))


def _overwritten(func, o: torch.Tensor, mask: torch.Tensor, nf: list, prior, args, ins) -> torch.Tensor | None:
    """Of a selected write (``_SELECTED_WRITES``, in place into a tensor already non-finite, ``prior``; or
    ``_SELECTED_COPIES``, out of place from non-finite inputs ``nf``) of a NaN/Inf constant (a number, a 0-dim
    constant): the elements it wrote, where it wrote a NaN/Inf (born there, whatever was there before), else None.
    Without it ``s.masked_fill_(m, -inf)`` on scores holding a padding NaN made no birth: a fully masked row's NaN
    was named after that padding NaN; and out of place the -inf written over a masked key's padding NaN kept that
    padding's birth, so a row another (used) NaN made NaN named the padding a genuine finding."""
    in_place = bool(prior) and not nf and func.overloadpacket in _SELECTED_WRITES
    if not args or not (in_place or (nf and not prior and func.overloadpacket in _SELECTED_COPIES)):
        return None
    if nonfinite_number(args) is None and not any(
            t.dim() == 0 and t is not o and _nonfinite(t) for t in ins):
        return None
    written = _written_by(func, o, args)
    return written if written is not None and bool(mask_any(written & mask)) else None


def _without_mask_infs(births: frozenset, x: torch.Tensor, dim: int, full_rows_nan: bool,
                       parts: list | None) -> frozenset:
    """The births that explain the NaN of softmax(x): softmax makes 0 of a -inf in a slice that keeps another
    value (an attention mask), so where x's NaN is all that makes its output NaN, births of infinities alone
    explain none of it (they were reported as a second, genuine root cause of a NaN that another birth made,
    whenever anything made an attention's scores NaN). An infinity's birth whose elements of x (its part) are NaN
    already (inf - inf in q @ k^T) that no NaN birth's part holds explains a NaN: dropped, the used Inf's NaN
    scores were told as the padding's NaN (a genuine padding finding, the Inf "reaching no gradient")."""
    if not _has_nan(x) or bool((x == float("inf")).any()) or (
            full_rows_nan and bool((x == float("-inf")).all(dim).any())):
        return births
    # (the NaN no NaN birth's part holds: a NaN score beside a mask's -inf, NaN + -inf, is the NaN's alone)
    nan = torch.isnan(x)
    for m, got in parts or ():
        if any(getattr(b, "nan", True) for b in got):
            nan = nan & ~m.broadcast_to(x.shape)
    made_nan = frozenset().union(*(got for m, got in parts or () if bool(mask_any(m.broadcast_to(x.shape) & nan))))
    kept = frozenset(b for b in births if getattr(b, "nan", True) or b in made_nan)
    return kept or births


class _Provenance(_Origins, _Parts):
    """Births of NaN/Inf and their provenance; names of the leaves gradients reach (a part of _Tracer)."""

    def _known(self, ins) -> bool:
        """Whether an input has a provenance: one recorded, or in gw.watch()'s replay one the untraced forward's
        values have by storage (a custom backward's ``h.detach()`` of a saved NaN, read by its own autograd.grad:
        passed over, the NaN was a second birth, "aten.tanh or an op before it")."""
        if any(t in self.prov for t in ins):
            return True
        return bool(self.replayed) and any(t.layout is torch.strided and readable(t) and
                                           t.untyped_storage().data_ptr() in self.replayed for t in ins)

    def _vague(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s births (several) are not told apart: an op lost its parts (``x.copy_(x.flip(0))``), so an
        incident meeting it met its whole provenance, not each birth at its elements (``Incident.vague``)."""
        return t not in self.parts and t not in self.exact and \
            sum(isinstance(b, _Birth) and b.op != "gradient" for b in self.prov.get(t, ())) > 1

    def _birth(self, op, loc, nan, name, mask, make, parents=(), received=False, batch=None,
               cause: tuple | None = None) -> _Birth:
        """The interned birth of this site (and ``cause``: the site of the earliest birth it descends from): its
        indices and description are computed the first time only."""
        n = _count(mask)
        key = self.store.birth_key(op, loc, nan, name, received, batch, n)
        if cause:
            key = (*key, "cause", cause)
        known = self.store.known(key)
        birth = self.store.birth(key, n, lambda: make(_first(mask)) if known is None else None, parents)
        if birth.shape is None:
            birth.shape = tuple(mask.shape)
        return birth

    def _dig(self, func, loc, ins, bad, seq, info, args=None, out=None, kwargs=None, made=None, old=None) -> None:
        if not self.depth:  # a forward NaN/Inf: this step's backward classifies by a shadow strong pass (_shadow)
            self.dirty = True
        self.hook = None
        node_seq = seq[0] if isinstance(seq, tuple) else seq
        nd = self.nodes.get(node_seq) if node_seq is not None else None
        if nd is not None and nd.op != TORCHSCRIPT and torchscript_node(torch._C._current_autograd_node()):
            # (the forward saw the scripted graph's outputs detached: its node is no aten.detach's backward)
            nd = self.nodes[node_seq] = _Node(TORCHSCRIPT, nd.loc)
        if loc is None:  # a node the forward did not record: a custom Function's backward runs the user's code
            frame = _user_frame()
            if nd is not None and (frame is None or (frame.f_code, frame.f_lineno) == self.backward_site):
                loc = nd.loc  # a backward formula: the forward op's line
            else:  # the user's code inside the backward (a tensor hook, a custom backward): its own line
                loc = _loc(frame) if frame is not None else nd.loc if nd is not None else ("<backward>", 0)
                # a hook's NaN/Inf is born at the hook, not in the node that runs it (_Incidents._classify)
                self.hook = engine_hook(frame, sys._getframe()) if frame is not None else None
        for o in bad:
            mask = _nonfinite_mask(o)
            prior = self.prov.get(o) if info.mutable else \
                self.prov.get(ins[0]) if node_seq == _ACCUMULATE_SEQ and func in _ACCUMULATES else None
            nf = [t for t in ins if t is not o and _nonfinite(t)]
            if seq is None or isinstance(seq, tuple):
                held, nf, read = read_inputs(self, func, o, prior, nf, ins, old, args)  # (a.div_(b): a's NaN/Inf)
                self._value(func, loc, o, mask, nf, held, nd, read,
                            base=o._base if info.mutable and o._base is not None else None, args=args, made=made,
                            kwargs=kwargs, out=out, forward=seq is None)
                if isinstance(seq, tuple) and nd is not None and nd.op in _TIES_COUNTED:
                    # (amax's saved NaN result, per element: _classify names each row's births)
                    nd.read = (*nd.read, *(self.parts.get(o) or [(~torch.isfinite(o), self.prov.get(o, frozenset()))]))
                # an in-place write made it non-finite (a .grad scaled by NaN: clip_grad_norm_'s _foreach_mul_)
                if o not in self.written and not any(isinstance(p, _Incident) for p in prior or ()) and any(
                        o is t for t in ins):
                    self.written[o] = (_op_name(func), loc)
                    (self.param_writes if o.is_leaf and o.requires_grad else self.value_writes).add(loc)
            elif prior:  # accumulating into a gradient already non-finite (a second backward): carry it
                self.prov[o] = prior.union(*(self.prov.get(t, frozenset()) for t in nf if t in self.sens))
            else:
                self._meet(func, loc, o, mask, ins, nf, nd, node_seq, args, out, kwargs)
            if info.mutable and o._base is not None and o in self.prov:
                # a sensitivity's writes into parts of one buffer add up (a packed RNN's backward copy_s each
                # step into it); a forward write replaces the written elements' births only (_written_parts)
                if seq is not None and not isinstance(seq, tuple):
                    self.prov[o._base] = self.prov.get(o._base, frozenset()) | self.prov[o]
                elif torch.Tag.inplace_view not in func.tags:  # (v.transpose_ writes nothing into v's base)
                    self._written_parts(o, o._base)

    def _value(self, func, loc, o, mask, nf, prior, nd, ins=(), base=None, args=None, made=None, kwargs=None,
               out=None, forward=False) -> None:
        """A forward value (``forward``; or one a backward formula made from saved values): propagate or record a
        birth. ``made``: the node record of the forward op that made ``o``, where a birth keeps its mask until the
        backward of that node says which of its elements the output uses (``_born_reached``)."""
        # An unknown 0-dim tensor is a wrapped constant (x[2] = nan): the value is born at this op; so is the
        # data of a literal (torch.tensor([..., nan]) reaches the dispatcher as lift_fresh of a fresh tensor).
        literal = func.overloadpacket in _LITERALS
        if literal and o.numel() <= 1:
            return  # a lifted scalar (x[2] = nan): the op that writes it is where it is born
        stale = self.parts.pop(o, None)  # an in-place op moved or wrote elements: its parts are redone (_kept_parts)
        self.exact.pop(o, None)
        stats = _running_stats(func, args)
        nf = [t for t in nf if (t in self.prov or ((t.dim() or t.requires_grad) and not literal))
              and not any(t is r for r in stats)]
        births = frozenset().union(*(self._origin(t, loc) for t in nf)) if nf else frozenset()
        if len(nf) == 1 and nf[0] in self.parts and args and args[0] is nf[0] and \
                (func.overloadpacket in _SELECTS or _is_view(func)):
            births = self._selected_parts(func, o, nf[0], args) or births
        elif len(nf) == 1 and nf[0] in self.parts and torch.Tag.reduction in func.tags and args and args[0] is nf[0]:
            births = self._reduced_parts(o, nf[0], func, args) or births
        elif len(nf) == 1 and nf[0] in self.parts and func.overloadpacket in _SCANS and args and args[0] is nf[0]:
            births = self._scanned_parts(o, nf[0], func, args) or births
        elif len(nf) == 1 and nf[0] in self.parts and func.overloadpacket in _ROWWISE and args and args[0] is nf[0]:
            births = self._rowwise_parts(o, nf[0], func, args, _ROWWISE[func.overloadpacket]) or births
        if made is not None and (func.overloadpacket in _ROWWISE or func.overloadpacket in _SCANS) and args and \
                isinstance(args[0], torch.Tensor):  # (its backward names each row's births: _Incidents._classify)
            made.rows = _row_dims(func, args, args[0].dim(), _ROWWISE.get(func.overloadpacket, "dim")) or ()
        if births and func.overloadpacket in _MASKING_SOFTMAX and args is not None and len(args) > 1:
            told = births
            births = _without_mask_infs(births, args[0], args[1], func.overloadpacket is torch.ops.aten._softmax,
                                        self.parts.get(args[0]))
            if births != told and o in self.parts:  # (so do its parts, _rowwise_parts': a row's -inf beside its NaN)
                self._keep(o, _united([(m, b & births) for m, b in self.parts[o] if b & births], o.shape))
        if prior:
            births |= prior
        has_nan = _nan_in(o, mask)  # no masked copy of o
        # an in-place op on a tensor already known non-finite (DDP's bucket.div_) carries its NaN, not makes it
        prior_nan = any(getattr(b, "nan", True) for b in prior) if prior else False
        new_nan = has_nan and not prior_nan and not any(_has_nan(t) for t in nf)
        if has_nan and not new_nan and not prior and func.overloadpacket in _NAN_OF_FULL_ROWS and \
                len(nf) == 1 and args is not None and len(args) > 1 and \
                self._fully_masked_rows(func, loc, o, nf[0], args[1], births):
            return
        # elementwise, NaN/Inf where every input is finite are born here beside the inputs' (masked_fill(-inf) of
        # a tensor holding NaN elsewhere: the -inf was told as that NaN's, and a fully masked row after it too)
        fresh, constant = _fresh(func, o, mask, nf, args, ins, forward and all(map(self.clean.get, nf))) \
            if nf and not prior and not new_nan else (None, False)
        written = _overwritten(func, o, mask, nf, prior, args, ins)
        if written is not None:
            fresh = written & mask
        if fresh is not None:
            mask, has_nan = fresh, _nan_in(o, fresh)
        if (not nf and not prior) or new_nan or fresh is not None:
            op = _op_name(func)
            born = _nan_mask(o) if new_nan and (nf or prior) else mask

            def make(idx):
                # x * float("nan"), masked_fill(m, -inf): the number made it, not a non-finite tensor
                number = None if nf and fresh is None else nonfinite_number(args or ())
                what = _explain(func, (nf if fresh is None or constant else []) or [t for t in ins if t is not o],
                                o, born, number)  # why, from its inputs (all, where it made NaN/Inf of finite ones)
                if nd is None and in_torchscript():
                    what += SCRIPTED
                if nd is not None and nd.op != op and (not nf or new_nan or fresh is not None) and loc == nd.loc:
                    what = f"{what} (in the backward formula of {nd.op})"
                return _Birth(op, loc, what, 0, idx, has_nan, formula=bool(self.depth))

            # elementwise, a NaN made beside the inputs' Inf (0/0 beside x's Inf): those keep their births, the NaN's
            # parents are the births of its own elements' infinities (none for a 0/0: it was told as that Inf's)
            beside = mask & ~born if fresh is None and new_nan and nf and pointwise(func) and \
                _aligned(nf, o.shape) else None
            own, beside = _own_infinities(o, born, beside, nf)
            if beside is not None and bool(beside.any()):
                births = frozenset().union(*(self._origin_at(t, loc, at) for t in nf if bool(
                    (at := born & ~torch.isfinite(t).broadcast_to(o.shape)).any())))
            else:
                beside = None
            b = self._birth(op, loc, has_nan, None, _in_base(born, o, base), make,
                            frozenset() if fresh is not None else births)
            if has_nan and fresh is None:  # (of finite inputs: made of no infinity, own)
                self._made(b, *(self._made_of(func, o, born, nf, args, loc) if nf else (frozenset(), True)))
            if made is not None and base is None and len(made.born) < _BORN_PER_NODE:
                made.born.append((b, born))
            if fresh is None:  # (born here as a whole: the parts a row-wise op took of its input are not its
                # births: softmax's NaN of a row's -inf and +inf named those writes, each a genuine finding)
                self.parts.pop(o, None)
            births = self._fresh_parts(o, own, b, nf, loc, beside) if beside is not None \
                else frozenset([b]) if fresh is None else self._fresh_parts(o, fresh, b, nf, loc) \
                if written is None else self._overwritten_parts(o, fresh, written, b, stale if prior else [
                    p for t in nf for p in self._parts_of(t, loc)], prior)
            stale = None
        elif not prior and (len(nf) > 1 or any(t in self.parts for t in nf)) and pointwise(func) \
                and _aligned(nf, o.shape):
            births = self._record_parts(o, nf, loc) or births
        elif not prior and func.overloadpacket in _JOINS and args and isinstance(args[0], (list, tuple)) and \
                (len(nf) > 1 or any(t in self.parts for t in nf)):
            self._joined_parts(func, o, args, loc)
        elif not prior and nf and (len(nf) > 1 or nf[0] in self.parts) and args and func.overloadpacket in _BILINEAR:
            births = self._bilinear_parts(func, o, nf, args, loc) or births
        elif not prior and len(nf) == 1 and nf[0] in self.parts and func.overloadpacket in _SAME_ELEMENTS \
                and o.shape == nf[0].shape:
            self.parts[o] = self.parts[nf[0]]  # (autograd saves a detached output: the backward reads it)
        elif not prior and len(births) > 1 and o not in self.parts and o not in self.exact and args is not None \
                and probes(func, args, kwargs):
            births = _probed_parts(self, func, o, nf, args, kwargs, out, loc) or births
        if stale is not None and prior and torch.Tag.inplace_view in func.tags:
            self._moved_parts(func, o, stale, args)
        elif stale is not None and prior and func.overloadpacket in _SCANS_IN_PLACE:
            # (else every birth at every element: a padding row's NaN named at the used rows, genuine)
            self.parts[o] = stale
            births = self._scanned_parts(o, o, func, args) or births
        elif stale is not None and prior and len(births) > 1:
            births = self._kept_parts(func, o, stale, nf, loc) or births
        if o in self.exact and any(self._vague(t) for t in nf):
            self.exact.pop(o)  # (one part made of an input whose parts were lost: its births, not each one's)
        elif o not in self.parts and len(nf) == 1 and nf[0] in self.exact and births == self.prov.get(nf[0]):
            self.exact[o] = True  # (any of its elements holds every birth: so do those an op keeps, s * ones(4))
        self.prov[o] = births
        self.clean[o] = _clean(self, func, o, nf, prior, forward)
        for r in stats:  # (what it wrote there descends from the batch, as its outputs do)
            if _nonfinite(r):
                self.prov[r] = births


def _own_infinities(o: torch.Tensor, born: torch.Tensor, beside: torch.Tensor | None, nf: list) -> tuple:
    """(the elements an elementwise op's birth owns: its NaN ``born`` and the Inf it made where every input is
    finite, the Inf elements ``beside`` them that an input's non-finite value made). A 1/0 beside a 0/0 and an
    input's Inf was told as that Inf's, at that Inf's element."""
    if beside is None:
        return born, None
    carried = _carried(o, nf)
    return born | (beside & ~carried), beside & carried


def _carried(o: torch.Tensor, nf: list) -> torch.Tensor:
    """The elements of ``o`` (an elementwise op's output) where an input in ``nf`` is NaN/Inf."""
    return functools.reduce(torch.logical_or, [~torch.isfinite(t).broadcast_to(o.shape) for t in nf])


def _clean(tr, func, o: torch.Tensor, nf: list, prior, forward: bool) -> bool:
    """Whether no finite element of the forward value ``o`` may descend from a NaN/Inf (``clean``): made of
    clean inputs by an elementwise op that left finite no element where an input is not (1 / inf, exp(-inf),
    where), or one that moves or multiplies them (a finite matmul reads finite elements only); not known after
    other ops (a softmax's 0 of -inf), nor after an in-place op on a tensor already non-finite. Only an elementwise
    op on clean inputs makes a birth of its own where every input is finite (``_fresh``): log of the 0 that x / inf
    made beside the NaN of inf / inf is the overflow's, not a log(0) of its own."""
    if not forward or prior:
        return False
    if not nf:
        return True
    if not all(tr.clean.get(t, False) for t in nf):
        return False
    if pointwise(func) and _aligned(nf, o.shape):
        return not bool(mask_any(_carried(o, nf) & torch.isfinite(o)))
    return func.overloadpacket in _SELECTS or func.overloadpacket in _SAME_ELEMENTS or func.overloadpacket in _JOINS \
        or func.overloadpacket in _BILINEAR or _is_view(func)
