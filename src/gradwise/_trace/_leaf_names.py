"""``_LeafNames``: the part of the tracer that names the leaves (parameters, inputs) a gradient reaches, by the
names the user knows them by (a variable, ``module.param``), and records which findings reach a final gradient.

May import: torch, gradwise._trace._common, _store.
"""

from __future__ import annotations

import threading

import torch

from gradwise._trace._common import (
    _ByIdentity,
    _is_internal,
    _loc,
    _nonfinite,
    _nonfinite_mask,
    _positions,
    _user_frame,
)
from gradwise._trace._store import Incident as _Incident
from gradwise._trace._store import count as _count

# leaf -> {location of the op that first read it in a trace: its name}: a training loop that opens a trace per
# step names its parameters once (the walk up the stack and over the modules' parameters costs ~0.1 ms per leaf).
# By identity (a WeakTensorKeyDictionary builds a Python-level weak reference per lookup: ~3 us, 12 a step of a
# 6-layer MLP); a dead leaf's small dict lives until the table's next purge
_LEAF_NAMES = _ByIdentity()
_NAMES_LOCK = threading.Lock()
_NAMES_PER_LEAF = 8
# the attributes PyTorch's module wrappers keep the wrapped module under (torch.compile's OptimizedModule,
# FSDP1, activation checkpointing), which PyTorch's own state-dict helpers strip from parameter names: the user
# knows `model.0.weight`, not `model._orig_mod.0.weight` (after `model = torch.compile(model)`)
_WRAPPERS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_DICT_ENTRIES = 4096  # a dict of a user frame larger than this is no parameter dict (not searched)


class _LeafNames:
    """Names of the leaves a gradient reaches (a part of _Tracer)."""
    def reached(self, grad: torch.Tensor, leaf: torch.Tensor) -> None:
        """A final gradient (from torch.autograd.grad) for `leaf`: record which findings reach it."""
        incs = [i for i in self.prov.get(grad, ()) if isinstance(i, _Incident)] if _nonfinite(grad) else []
        self._reach(incs, grad, leaf)
        if not incs and _nonfinite(grad):
            self.store.orphan(self.leaf_name(leaf), _count(_nonfinite_mask(grad)))

    def _reach(self, incs: list, g: torch.Tensor, leaf: torch.Tensor) -> None:
        """The incidents ``incs`` of a non-finite gradient ``g`` of ``leaf`` reach it: contamination under a
        genuine NaN/Inf in every element stops there (``covered``), or is not known beside one (``unsure``); a
        genuine incident counts ``g``'s non-finite elements (``reached_elements``, the first ones' indices)."""
        covered = self._covered(g, incs) if incs else False
        n = idx = None
        for inc in incs:
            if covered and inc.kind == "contamination":  # (under a genuine NaN/Inf in every element)
                inc.covered = True
                continue
            if covered is None and inc.kind == "contamination":  # (beside a genuine one, not known)
                inc.unsure.add(self.leaf_name(leaf))
            if inc.kind != "contamination":
                n, idx = self._kept_elements(g) if n is None else (n, idx)
                inc.reached_elements += n
                inc.reached_indices = inc.reached_indices or idx
            inc.reaches.add(self.leaf_name(leaf))
            self.reached_now.add(id(inc))

    def _kept_elements(self, g: torch.Tensor) -> tuple[int, list]:
        """The non-finite elements of the gradient ``g`` that gw.strong_zeros() keeps (the shadow pass's, where the
        trace runs one; else all): a backward-born Inf's count beside a contaminated element (sqrt at 0 of an
        expanded x, one column sliced away) counted that element too."""
        bad = _nonfinite_mask(g)
        strong = self._strong_of(g)
        if strong is not None and strong.shape == g.shape:
            bad = bad & ~torch.isfinite(strong)
        return _positions(bad)

    def leaf_name(self, t: torch.Tensor) -> str:
        name = self.names.get(t)
        if name is None:
            frame = _user_frame()
            self._name_leaves([t], frame, _loc(frame) if frame is not None else None)
            name = self.names[t]
        return name

    def _name_leaves(self, new: list[torch.Tensor], frame, loc) -> None:
        """Name the leaves an op at ``loc`` reads for the first time in this trace: as an earlier trace named them
        at the same place (a loop that opens a trace per step), else by one walk up the stack for all of them (a
        weight and its bias)."""
        unknown = []
        with _NAMES_LOCK:
            for t in new:
                name = _LEAF_NAMES.get(t, {}).get(loc)
                if name is None:
                    unknown.append(t)
                else:
                    self.names[t] = name
        if not unknown:
            return
        found = self._search_names(unknown, frame)
        with _NAMES_LOCK:
            for t, name in zip(unknown, found, strict=True):
                self.names[t] = name
                at = _LEAF_NAMES.get(t)
                if at is None or len(at) >= _NAMES_PER_LEAF:
                    at = _LEAF_NAMES[t] = {}
                at[loc] = name

    def _search_name(self, t: torch.Tensor, frame) -> str:
        return self._search_names([t], frame)[0]

    def _search_names(self, ts: list[torch.Tensor], frame) -> list[str]:
        """The names the user knows ``ts`` by: a variable, or `module.param` for a module's parameter; the
        outermost user frame that has one wins (the script's `model.fc.weight` over a method's
        `self.fc.weight`), and within a frame a module's path wins over a variable (`for p in
        model.parameters()` leaves `p` bound to the last parameter)."""
        best: dict[int, str] = {}
        wanted = {id(t) for t in ts}
        f = frame
        while f is not None:
            if not _is_internal(f.f_code):
                direct: dict[int, str] = {}
                paths: dict[int, str] = {}
                entries: dict[int, str] = {}  # a dict's values: functional_call's parameters (params['weight'])
                for k, v in list(f.f_locals.items()):
                    if id(v) in wanted:
                        direct.setdefault(id(v), k)
                    elif isinstance(v, torch.nn.Module):
                        names = self._param_names(v)
                        for i in wanted:
                            p = names.get(i)
                            if p is not None and not (i in best and k == "self"):
                                paths[i] = f"{k}.{p}"
                    elif isinstance(v, dict) and len(v) <= _DICT_ENTRIES:
                        for key, t in list(v.items()):
                            if id(t) in wanted and isinstance(key, str):
                                entries.setdefault(id(t), f"{k}[{key!r}]")
                best.update(entries)
                best.update(direct)
                # a module's path wins, unless the module only holds the tensor for a while: functional_call swaps
                # a dict's tensors (no nn.Parameter) in, and module.weight is the module's own again afterwards
                best.update({i: p for i, p in paths.items() if i not in entries or _is_parameter(ts, i)})
            f = f.f_back
        return [best.get(id(t)) or f"tensor{list(t.shape)}" for t in ts]

    def _param_names(self, module) -> dict:
        names = self.module_names.get(module)
        if names is None:
            names = self.module_names[module] = {id(p): _unwrapped(n) for n, p in module.named_parameters()}
        return names


def _is_parameter(ts: list[torch.Tensor], i: int) -> bool:
    return any(id(t) == i and isinstance(t, torch.nn.Parameter) for t in ts)


def _unwrapped(name: str) -> str:
    """A parameter's name without the module wrappers' attributes (``_WRAPPERS``)."""
    parts = name.split(".")
    return name if _WRAPPERS.isdisjoint(parts) else ".".join(p for p in parts if p not in _WRAPPERS)
