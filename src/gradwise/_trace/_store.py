"""What `gw.trace()` keeps: births and incidents interned per site, so memory is bounded by the program's
source, not by the number of steps.

A training run that goes NaN makes the same NaN at the same (op, line) on every step. Each such event is
interned by its site: the first occurrence keeps its details (step, element indices, description), every later
one only adds to counters (occurrences, elements, the steps of the first ``KEEP`` occurrences, and the union of
what it came from). Provenance sets therefore hold a bounded set of objects, the report walks a bounded graph,
and the per-step cost does not grow with the step count. ``order`` (creation order) replaces list searches, so
building the report is linear in what is kept.

May import: torch, gradwise._trace._facts; gradwise._trace._common (lazily, for path formatting).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from gradwise._trace._facts import WRITTEN_MASK

KEEP = 4  # steps remembered per site (the first occurrences)
_COUNTS = 8  # later DataLoader batches at an arrival site: kept apart by their NaN/Inf count, this many
_SHOWN = 4  # indices shown per finding
_BLOCK = 4096  # first() scans masks in blocks of this many elements


@dataclass(eq=False)
class Birth:
    """Where a NaN/Inf value first appeared (a forward op, a backward formula on saved values, or the data),
    interned per (op, line, name, NaN or Inf): ``count`` and ``occurrences`` add up over the steps."""

    op: str
    loc: tuple
    what: str
    count: int
    indices: list
    nan: bool
    name: str | None = None  # for data that arrived non-finite
    batch: int | None = None  # ... in this batch of a DataLoader (its index, counted from 0), the first time
    batches: list = field(default_factory=list)  # the DataLoader batches of its first KEEP occurrences
    parents: set = field(default_factory=set)  # the births it came from (the union over occurrences)
    used: bool = False
    received: bool = False  # read from a collective's buffer: another rank's NaN/Inf
    order: int = 0  # creation order among births (the report sorts by it)
    step: int = 0  # step of the first occurrence
    occurrences: int = 1
    steps: list = field(default_factory=list)  # steps of the first KEEP occurrences
    last: int = 0  # step of the latest occurrence
    first_count: int = 0  # elements of the first occurrence
    shape: tuple | None = None  # of the born tensor (the first occurrence's)
    in_steps: int = 1  # the steps it occurred in (occurrences / in_steps: how often a step makes it)
    # its elements a nonzero (or NaN/Inf) sensitivity reached at the node that made it (summed over steps; None: not
    # known), and the first of them: the elements the output uses, however the backward mixes them further down
    sensed: int | None = None
    sensed_indices: list = field(default_factory=list)
    formula: bool = False  # made by a backward formula from saved values (pow's self ** -0.5 at 0)
    made_of: frozenset = frozenset()  # a NaN's: the births of the infinities at its elements (_infinities_at)
    own: bool = False  # a NaN with an occurrence made of no infinity (0/0): its own root beside made_of's

    def describe(self) -> str:
        from gradwise._trace._common import _fmt  # the trace's path formatting (relative to the working directory)

        kind = "NaN" if self.nan else "Inf"
        n = f"{self.first_count} {kind} value(s)" + (f" (x{self.occurrences}, {self.count} in all)"
                                                     if self.occurrences > 1 else "")
        if self.op == "seed":
            return f"the seed of the backward at {_fmt(self.loc)} holds {n} (its grad_tensors / grad_outputs)"
        if self.op == "input":
            name = self.name or "a tensor"
            batches = self.batches or ([] if self.batch is None else [self.batch])
            more = ", ..." if self.occurrences > len(batches) > 1 else ""
            batch = "" if not batches else f" in DataLoader batch {batches[0]}" if len(batches) == 1 else \
                f" in DataLoader batches {', '.join(map(str, batches))}{more}"
            return f"{name} arrived with {n}{batch} (first used at {_fmt(self.loc)})"
        return f"{self.op} at {_fmt(self.loc)} made {n}: {self.what}"


@dataclass(eq=False)
class Incident:
    """A non-finite gradient element born in the backward (a sensitivity met a non-finite value), interned per
    (kind, backward op, node op, line, discarding op, earliest birth)."""

    kind: str  # "contamination", "nan" or "inf"
    op: str  # the backward aten op
    node_op: str  # the forward op whose backward it is
    loc: tuple
    count: int
    indices: list
    births: set
    what: str
    discarded: tuple | None = None  # (op, loc) of the forward op whose backward made the zero sensitivity
    reaches: set = field(default_factory=set)
    undecided: bool = False  # met in a backward op the trace cannot split (no strong-zero rule)
    vague: bool = False  # its births are a saved value's whole provenance, its parts lost: not each one used
    unfollowed: bool = False  # a sparse/mkldnn/nested operand took part: strong zeros run that backward plain
    annihilated: bool = False  # a structural zero downstream annihilated (some of) it (see _SavedMeets._annihilated)
    # a genuine NaN/Inf covered every element it reached in an op that mixes (_flow._mixed): it stopped there,
    # though the gradient took it in (not a value no gradient used)
    covered: bool = False
    # leaves whose gradient it reached beside a genuine NaN/Inf where no shadow strong pass said whether strong
    # zeros leave its elements finite (create_graph, grad enabled in a hook): contamination or covered, not known
    unsure: set = field(default_factory=set)
    order: int = 0
    step: int = 0
    occurrences: int = 1
    # the non-finite elements of the gradients it reached (summed over steps): a backward-born NaN/Inf whose
    # elements a backward op dropped on the way (pad's backward crops the padded border) used at most these
    reached_elements: int = 0
    reached_indices: list = field(default_factory=list)  # the first of them, in the first gradient's coordinates
    steps: list = field(default_factory=list)
    last: int = 0
    serial: int = 0  # the store's event counter when last seen (nested blocks report what they saw)
    shape: tuple | None = None  # of the backward op's output its elements are in
    in_steps: int = 1  # the steps it occurred in (as Birth's)


def describe_arrivals(births: list[Birth]) -> str:
    """Data that arrived non-finite at one site in several DataLoader batches kept apart (``Store.birth_key``),
    told as one: the first batch's details, the totals and the batches."""
    first = births[0]
    if len(births) == 1:
        return first.describe()
    batches = [i for b in births for i in (b.batches or [b.batch])]
    return replace(first, count=sum(b.count for b in births), occurrences=sum(b.occurrences for b in births),
                   batches=list(dict.fromkeys(batches))[:KEEP]).describe()


def earliest(births, kind: str | None = None) -> Birth | None:
    """The birth that explains a NaN/Inf coming from several: a gradient inherited from an earlier backward (a
    NaN parameter makes every later value NaN, so it explains the others), else the earliest-made (creation
    order: linear, no list search)."""
    inherited = [b for b in births if b.op == "gradient"]
    if inherited:
        return min(inherited, key=_order)
    # an infinity written on purpose (an attention mask's -inf, made before the scores) explains no NaN that another
    # birth's infinity made where they met (+inf - inf): that birth does
    made = [b for b in births if b.nan or b.parents or b.what != WRITTEN_MASK]
    if kind == "nan":  # a NaN incident is explained by a NaN birth beside an Inf one (p[0, 0] = inf; p[:, 3:] = nan)
        made = [b for b in made or births if b.nan] or made
    return min(made or births, key=_order, default=None)


def _order(b: Birth) -> int:
    return b.order


def descended(births, through: str = "parents") -> frozenset:
    """``births`` and every birth they descend from (through ``parents``, or ``made_of``: the infinities a NaN
    was made of at its elements)."""
    seen: dict[int, Birth] = {}
    stack = list(births)
    while stack:
        b = stack.pop()
        if id(b) not in seen:
            seen[id(b)] = b
            stack.extend(getattr(b, through, ()))
    return frozenset(seen.values())


def root(birth: Birth) -> Birth:
    """The earliest birth ``birth`` descends from (through ``parents``; interning can close cycles, so the walk
    marks what it has seen)."""
    return min(descended((birth,)), key=lambda b: (b.order, b is not birth))  # (itself at a tie)


class Store:
    """The interned births and incidents of one trace, with the step counter."""

    __slots__ = ("arrivals", "births", "incidents", "orphans", "serial", "step")

    def __init__(self) -> None:
        self.births: dict[tuple, Birth] = {}
        self.incidents: dict[tuple, Incident] = {}
        self.step = 0
        self.serial = 0
        self.orphans: dict[str, list] = {}  # leaf name -> [elements, occurrences, serial]
        self.arrivals: dict[tuple, set] = {}  # arrival site (DataLoader data) -> the keys of its births

    def birth_key(self, op: str, loc: tuple, nan: bool, name: str | None, received: bool = False,
                  batch: int | None = None, count: int = 0) -> tuple:
        """The site a birth is interned by. Data arriving non-finite from a DataLoader is one arrival per batch:
        one batch's padding that the loss never reads and another batch's real NaN are different findings at
        the same line. The first KEEP batches at a site stay apart, later ones by their NaN/Inf count (a
        different count: different data), ``_COUNTS`` of them, and the rest together: bounded over long runs."""
        key = (op, loc, nan, name, received)
        if batch is None:
            return key
        kept = self.arrivals.setdefault(key, set())
        arrival = (*key, "batch", self.step, batch)
        if arrival in kept or len(kept) < KEEP:
            kept.add(arrival)
            return arrival
        by_count = (*key, "count", count)
        if by_count in kept or len(kept) < KEEP + _COUNTS:
            kept.add(by_count)
            return by_count
        return (*key, "rest")

    def known(self, key: tuple) -> Birth | None:
        return self.births.get(key)

    def birth(self, key: tuple, count: int, make, parents=()) -> Birth:
        """The interned birth for ``key``: ``make()`` builds it the first time (its indices and description),
        later occurrences add their element count and parents."""
        self.serial += 1
        b = self.births.get(key)
        if b is None:
            b = self.births[key] = make()
            b.order, b.step, b.steps, b.count, b.first_count = len(self.births), self.step, [self.step], count, count
            b.parents = {p for p in parents if p is not b}
            b.last = self.step
            return b
        b.in_steps += b.last != self.step
        b.last = self.step
        b.count += count
        b.occurrences += 1
        if len(b.steps) < KEEP and b.steps[-1] != self.step:
            b.steps.append(self.step)
        for p in parents:
            if p is not b:
                b.parents.add(p)
        return b

    def incident(self, kind, op, node_op, loc, count, indices, births, what, discarded, undecided) -> Incident:
        self.serial += 1
        first = earliest(births, kind)
        key = (kind, op, node_op, loc, discarded, first.order if first is not None else None)
        inc = self.incidents.get(key)
        if inc is None:
            inc = self.incidents[key] = Incident(kind, op, node_op, loc, count, indices, set(births), what,
                                                 discarded, undecided=undecided)
            inc.order, inc.step, inc.steps = len(self.incidents), self.step, [self.step]
        else:
            inc.count += count
            inc.occurrences += 1
            inc.in_steps += inc.last != self.step
            inc.births.update(births)
            inc.undecided = inc.undecided or undecided
            if len(inc.steps) < KEEP and inc.steps[-1] != self.step:
                inc.steps.append(self.step)
        inc.serial, inc.last = self.serial, self.step
        return inc

    def orphan(self, name: str, count: int) -> None:
        self.serial += 1
        o = self.orphans.setdefault(name, [0, 0, 0])
        o[0] += count
        o[1] += 1
        o[2] = self.serial

    def kept(self) -> int:
        """How many records the store holds (bounded by the program's sites, not by its steps)."""
        return len(self.births) + len(self.incidents) + len(self.orphans)


# -- small mask helpers (shared with the trace) ---------------------------------------------------------------


def held(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its broadcast (stride-0) dimensions cut to length 1: the elements it stores, once. A mask or a
    check of an expanded view then costs what the view stores, not its full size (a NaN expanded to 10^8
    elements made 10^8-byte masks)."""
    if t.layout is not torch.strided:
        return t
    stride = t.stride()
    if 0 not in stride or not t.numel() or not any(s == 0 and n > 1 for n, s in zip(t.shape, stride, strict=True)):
        return t  # (on every checked output of every op: the common case decided by one C-level test)
    return t.as_strided([1 if s == 0 else n for n, s in zip(t.shape, stride, strict=True)], stride,
                        t.storage_offset())


def first(mask: torch.Tensor) -> list[list[int]]:
    """The first few True (nonzero) positions of a bool or 0/1 mask, without listing them all (masks can be
    large). The first block holding one is found by a max per block: PyTorch's argmax over a large bool/uint8
    mask is ~100x slower. Of an expanded mask, the positions of what it stores (index 0 along a broadcast
    dimension): the first is the view's first."""
    mask = held(mask)
    flat = mask.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    n = flat.numel()
    if n == 0:
        return []
    start = 0
    if n > _BLOCK:
        full = n - n % _BLOCK
        blocks = flat[:full].view(-1, _BLOCK).amax(1).nonzero()
        start = int(blocks[0]) * _BLOCK if len(blocks) else full
    found = flat[start : start + _BLOCK].nonzero()
    if not len(found):
        return []
    start += int(found[0])
    hits = flat[start : start + _BLOCK].nonzero()[:_SHOWN].flatten() + start
    if not mask.dim():
        return [[]]
    out = []
    for i in hits.tolist():  # unravel a handful of flat indices in Python (torch.unravel_index costs ~25 us)
        idx = []
        for n in reversed(mask.shape):
            i, r = divmod(i, n)
            idx.append(r)
        out.append(idx[::-1])
    return out


def count(mask: torch.Tensor) -> int:
    """How many elements of a bool or 0/1 mask are set (count_nonzero on floats is ~40x slower than a sum). Of
    an expanded mask: its stored part's count times how often the view repeats it."""
    part = held(mask)
    if part is not mask:
        return count(part) * (mask.numel() // part.numel())
    if mask.dtype == torch.bool:
        return int(torch.count_nonzero(mask))
    if mask.numel() <= 1 << 24 and mask.dtype == torch.float32:
        # every partial sum of 0/1 values is an integer <= 2**24, exact in float32, and float32 sums vectorise
        # (a float64 accumulation of float32 does not: ~17x slower, 0.2 ms of a max-pool tie count)
        return int(mask.sum())
    return int(mask.sum(dtype=torch.float64))
