"""Where each aten op kinks (or is singular, or jumps) and what PyTorch's backward returns there: ``KINKS`` (aten
overload packet -> ``KinkFact``), ``kink_fact``, ``at_kink``, the records ``OpCall`` and ``Site``, and one named
location function per op family.

A location function takes one ``OpCall`` (plain tensors; with the output when its fact ``needs_out``) and returns
a ``Site``, a mask of where the call sits at its kink (bool or 0./1.; a callable makes it on demand), or None where
this call cannot be at one. Locations read the data (both readers run in eager mode).

Readers: the trace reports each site with its convention (``_trace/_kinks.py``); nonsmooth calculus refuses a call
it cannot route when ``at_kink`` (``_nonsmooth/_kink_watch.py``). For nonsmooth a missed kink is a silent wrong
derivative and an extra one only a needless refusal: every location is exact or, where marked ``coarse``, a
superset.

Flags, not second tables:

- kind ``"jump"`` (floor, sign, remainder ...): a discontinuity, where PyTorch's value is the derivative on both
  sides; nonsmooth needs it (no directional derivative exists there), the trace has nothing to explain and skips it.
- ``coarse``: a superset, right for refusing but too coarse to name elements in a report; the trace skips it.
- ``guard``: PyTorch's own code calls the op away from kinks (zero and overflow guards: amax/amin, comparisons);
  nonsmooth counts it only in code it cannot see (TorchScript). A comparison makes no autograd node: the trace
  reports its tie at the ``where`` that reads it (``_trace/_facts._COMPARISONS``).

May import: torch, math only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradwise._ops._cuts import maybe_power_cut, on_branch_cut, power_cut

aten = torch.ops.aten
Tensor = torch.Tensor


@dataclass
class OpCall:
    """One aten call as a location function sees it."""

    args: tuple
    kwargs: dict
    out: object = None
    packet: str = ""  # the overload packet's name, "relu_" for the in-place call

    def arg(self, i: int, name: str, default=None):
        return self.args[i] if len(self.args) > i else self.kwargs.get(name, default)


@dataclass
class Site:
    """Where one call sits at its kink."""

    mask: Tensor | Callable[[], Tensor]  # bool or 0./1.; a callable makes it on demand
    aligned: bool = True  # mask has the output's shape (so the incoming sensitivity can be read there)
    found: Tensor | bool | None = None  # may the mask hold a True? (a 0-dim flag, or decided; None: read the mask)
    kind: str = ""  # "kink", "singular" or "jump"; "" takes the fact's
    convention: str = ""  # PyTorch's value there; "" takes the fact's
    # where the mask is not aligned: the elements of the (first) output whose value reads a kink, as a bool mask
    # or a callable making one (their incoming sensitivity says whether the convention mattered); None: any
    reads: Tensor | Callable[[], Tensor] | None = None


@dataclass(frozen=True)
class KinkFact:
    locate: Callable[[OpCall], Site | None]
    kind: str  # "kink", "singular" (an infinite derivative) or "jump"
    convention: str  # what PyTorch's backward returns there
    needs_out: bool = False  # the location reads the output (else it can run before the op: in-place calls)
    coarse: bool = False
    guard: bool = False
    # from the call's non-tensor arguments and dtypes alone (no data read): can this call kink at all? (x ** 2
    # cannot). A watched callable that reaches the op where it cannot is smooth for calls with the same such
    # arguments; reads_numbers: ``possible`` reads a number's value (pow's exponent), not only strings, dtypes ...
    possible: Callable[[OpCall], bool] | None = None
    reads_numbers: bool = False
    # where PyTorch's derivative formula is wrong though f is smooth (fmod's divisor slope where x / y rounds):
    # gradwise's rule corrects it; code the rules cannot see (TorchScript) must refuse there as at a kink
    formula_off: Callable[[OpCall], bool] | None = None

    def site(self, call: OpCall) -> Site | None:
        """The call's site, its kind and convention filled in from the fact where the location set none."""
        s = self.locate(call)
        if s is not None:
            s.kind = s.kind or self.kind
            s.convention = s.convention or self.convention
        return s


KINKS: dict = {}


def _kink(*ops, convention: str, kind: str = "kink", needs_out: bool = False, coarse: bool = False,
          guard: bool = False, possible: Callable[[OpCall], bool] | None = None, reads_numbers: bool = False):
    """Register a location function for ``ops`` (overload packets, out-of-place)."""

    def register(fn):
        for op in ops:
            KINKS[op] = KinkFact(fn, kind, convention, needs_out, coarse, guard, possible, reads_numbers)
        return fn

    return register


def kink_fact(func) -> KinkFact | None:
    """The fact of an aten op (an OpOverload, its packet, or an in-place variant), or None for an op without kinks."""
    packet = getattr(func, "overloadpacket", func)
    fact = KINKS.get(packet)
    name = getattr(packet, "__name__", "")
    if fact is None and name.endswith("_"):
        fact = KINKS.get(getattr(aten, name[:-1], None))
    return fact


def at_kink(fact: KinkFact, call: OpCall) -> bool:
    """Whether the call sits at its kink somewhere: the site's mask holds a True."""
    site = fact.locate(call)
    if site is None or site.found is False:
        return False
    mask = site.mask() if callable(site.mask) else site.mask
    return bool(mask.any())


# -- helpers ------------------------------------------------------------------------------------------------


def _float(t) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _where_zero(c: OpCall) -> Site:
    """Where the input is exactly 0; the mask is made only when a 0 is there (a compare into bool over every
    element costs ~3x a reduction on CPU). In-place calls compare now, before x is overwritten."""
    x = c.args[0].detach()
    if c.packet.endswith("_") or x.numel() == 0:
        return Site(x == 0)
    if x.device.type == "cpu" and x.is_contiguous() and x.is_floating_point():
        least = _least_magnitude(x).item()
        return Site(lambda: x == 0, found=least == 0 or least != least)  # NaN can hide a 0
    return Site(lambda: x == 0, found=torch.count_nonzero(x) < x.numel())


_SCRATCH = threading.local()
_SCRATCH_SIZE = 1 << 20  # elements
_FRESH_BYTES = 1 << 16  # a temporary this small comes from the heap's free blocks: cheaper than the buffer's views


def _least_magnitude(x: Tensor) -> Tensor:
    """min |x| (NaN if x holds one) of a contiguous CPU tensor, through a reused per-thread buffer of at most
    2**20 elements: a temporary as large as x would cost fresh pages on every call (the allocator hands large
    blocks back to the OS), and counting nonzeros instead is ~2x slower. One of at most 64 kB (a 128 x 128
    activation) goes through a temporary: the heap reuses its freed block, and the buffer's views cost more."""
    if x.numel() * x.element_size() <= _FRESH_BYTES:  # (below malloc's mmap threshold: no fresh pages)
        return x.abs().amin()
    flat = x.view(-1)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != x.dtype or buf.numel() < min(flat.numel(), _SCRATCH_SIZE):
        buf = _SCRATCH.buf = torch.empty(min(flat.numel(), _SCRATCH_SIZE), dtype=x.dtype)
    if flat.numel() <= _SCRATCH_SIZE:  # one chunk (no split: this runs on every relu the trace sees)
        return torch.abs(flat, out=buf[: flat.numel()]).amin()
    least = [torch.abs(chunk, out=buf[: chunk.numel()]).amin() for chunk in flat.split(_SCRATCH_SIZE)]
    return least[0] if len(least) == 1 else torch.stack(least).amin()


def _equal(a, b) -> Site | None:
    """Where two operands are equal, broadcast to the output's shape (None unless one is a float tensor)."""
    if not (_float(a) or _float(b)):
        return None
    eq = a == b
    shape = torch.broadcast_shapes(*(t.shape for t in (a, b) if isinstance(t, Tensor)))
    return Site(torch.broadcast_to(eq, shape))


def _integral(x: Tensor) -> Tensor:
    return x == x.round()


def slice_dims(x: Tensor, dim) -> list[int]:
    """The dims a reduction over ``dim`` reads (None or []: all of x's)."""
    if dim is None or (not isinstance(dim, int) and not list(dim)):
        return list(range(x.dim()))
    return [d % max(x.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim)]


def slice_equal(x: Tensor, value: Tensor, dim, keepdim: bool) -> Tensor:
    """Elements equal to their slice's value, ``value`` being a reduction of x over ``dim`` (None or []: all)."""
    if not keepdim:
        for d in sorted(slice_dims(x, dim)):
            value = value.unsqueeze(d)
    return x == value


def _slice_ties(x: Tensor, value: Tensor, dim, keepdim: bool) -> Tensor:
    """Elements equal to their slice's selected value, in slices where more than one is (dim None or []: all)."""
    eq = slice_equal(x, value, dim, keepdim)
    return eq & (eq.sum(slice_dims(x, dim), keepdim=True) > 1)


def _tied_slices(x: Tensor, value: Tensor, dim, keepdim: bool) -> Site:
    """``_slice_ties`` as a site, with the reduction's outputs whose slice is tied (``Site.reads``)."""
    eq = slice_equal(x, value, dim, keepdim)
    tied = eq.sum(slice_dims(x, dim), keepdim=True) > 1
    reads = tied if keepdim else tied.squeeze(tuple(slice_dims(x, dim))) if x.dim() else tied.reshape(())
    return Site(eq & tied, aligned=False, reads=reads)


def _both_sides(tie: Tensor, dim: int) -> Tensor:
    """Positions i and i + 1 along ``dim`` for each tie of neighbours i, i + 1 (``tie`` one shorter there)."""
    pad = [0, 0] * (tie.dim() - 1 - dim % tie.dim())
    return F.pad(tie.bool(), [*pad, 0, 1]) | F.pad(tie.bool(), [*pad, 1, 0])


def _in_input(like: Tensor, dim: int, marks: list) -> Tensor:
    """A bool mask shaped like the input: True at the input positions ``index`` where ``mark`` is set."""
    out = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    for index, mark in marks:
        out.scatter_add_(dim, index, mark)
    return out > 0


# -- elementwise switches -----------------------------------------------------------------------------------


@_kink(aten.relu, convention="relu'(0) = 0")
def _relu_at_zero(c):
    """relu at 0: the backward uses 0 there (x > 0 counts as the active side)."""
    return _where_zero(c)


@_kink(aten.abs, convention="abs'(0) = 0")
def _abs_at_zero(c):
    """abs at 0: the backward uses sign(0) = 0."""
    return _where_zero(c)


@_kink(aten.special_i0e, convention="0 at 0 (sgn(0) = 0), between the slopes -1 and 1")
def _i0e_at_zero(c):
    """i0e(x) = exp(-|x|) I0(x) at 0: |x| kinks there (slopes -1 and 1); the backward uses sgn(0) = 0."""
    return _where_zero(c)


@_kink(aten.sign, aten.sgn, kind="jump", convention="0, as on both sides")
def _sign_at_zero(c):
    """sign/sgn jump at 0; the backward is 0 everywhere."""
    return _where_zero(c)


@_kink(aten.leaky_relu, aten.prelu, aten._prelu_kernel, convention="the negative slope at 0")
def _leaky_relu_at_zero(c):
    """leaky_relu / prelu at 0: the backward uses the negative slope (x > 0 counts as positive)."""
    return _where_zero(c)


@_kink(aten.rrelu_with_noise, convention="the sampled negative slope at 0")
def _rrelu_at_zero(c):
    """rrelu at 0: the backward uses the noise, the negative slope (sampled in training)."""
    return _where_zero(c)


@_kink(aten.elu, convention="the negative side's slope at 0")
def _elu_at_zero(c):
    """elu at 0, unless alpha * input_scale == 1 (both sides' slopes agree): the backward uses the negative side's
    slope (x <= 0)."""
    if c.arg(1, "alpha", 1) * c.arg(3, "input_scale", 1) == 1:
        return None
    return _where_zero(c)


@_kink(aten.clamp, aten.clamp_min, aten.clamp_max, convention="gradient 1 at the bound (torch 2.13; 0 in 2.14)")
def _clamp_at_bound(c):
    """clamp at a bound: in torch 2.13 the backward passes the gradient (1) at a scalar bound; this changes
    between releases (0 in 2.14), which is why it is worth knowing."""
    x = c.args[0]
    if c.packet.startswith(("clamp_min", "clamp_max")):
        bounds = [c.args[1]]
    else:
        bounds = [c.arg(1, "min"), c.arg(2, "max")]
    mask = torch.zeros((), dtype=torch.bool)
    for b in bounds:
        if b is not None:
            mask = mask | (x == b)
    return Site(torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, x.shape)))


def _clamps_first(c: OpCall) -> bool:
    """logit with an eps >= 0 clamps x to [eps, 1 - eps] first (None, a negative or NaN eps: no clamp)."""
    eps = c.arg(1, "eps")
    return eps is not None and eps >= 0


@_kink(aten.logit, convention="1 / (x (1 - x)) at eps and 1 - eps (the inside's)", possible=_clamps_first)
def _logit_at_its_clamp(c):
    """logit(x, eps) is logit(clamp(x, eps, 1 - eps)): the clamp's kinks at eps and 1 - eps (constant outside);
    the backward uses the inside's slope there. The bounds in x's dtype, as the kernel makes them (float32's
    1 - eps rounded from float64 can miss its 1 - float32(eps))."""
    x = c.args[0]
    if not _clamps_first(c) or not _float(x):
        return None
    lo = torch.tensor(c.arg(1, "eps"), dtype=x.dtype, device=x.device)
    return Site((x == lo) | (x == 1 - lo))


@_kink(aten.hardtanh, convention="0 at the bounds")
def _hardtanh_at_bound(c):
    """hardtanh at min_val / max_val: the backward uses 0 there (strictly inside counts as active)."""
    x = c.args[0]
    return Site((x == c.arg(1, "min_val", -1.0)) | (x == c.arg(2, "max_val", 1.0)))


@_kink(aten.threshold, convention="0 at the threshold")
def _threshold_at_threshold(c):
    """threshold at its threshold: the backward uses 0 there (x <= threshold counts as below)."""
    return Site(c.args[0] == c.args[1])


@_kink(aten.softplus, convention="the log1p piece at beta x = threshold (a jump to x above it)")
def _softplus_at_threshold(c):
    """softplus switches from log1p(exp(beta x)) / beta to x itself where beta x > threshold: a jump there."""
    x = c.args[0]
    return Site(x * c.arg(1, "beta", 1.0) == c.arg(2, "threshold", 20.0))


@_kink(aten.hardshrink, aten.softshrink, convention="0 at ±lambda")
def _shrink_at_lambda(c):
    """hard/softshrink at ±lambda: the backward uses 0 there."""
    return Site(c.args[0].abs() == c.arg(1, "lambd", 0.5))


@_kink(aten.hardsigmoid, aten.hardswish, convention="one side's slope at ±3")
def _hard_activation_at_3(c):
    """hardsigmoid / hardswish at ±3: the backward uses one side's slope (0 for hardsigmoid, x/3 + 1/2 for
    hardswish)."""
    return Site(c.args[0].abs() == 3)


@_kink(aten.copysign, convention="0 to x at x = 0; the sign of y's zero at y = 0")
def _copysign_at_zero(c):
    """copysign(x, y) at x = 0 (|x| kinks) or y = 0 (the sign jumps): the backward gives x 0 at x = 0 and takes
    the side from the sign bit of y's zero."""
    x, y = c.args[0], c.args[1]
    if not _float(x):
        return None
    mask = (x == 0) | (y == 0) if isinstance(y, Tensor) else (x == 0)
    return Site(torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, x.shape)))


# -- two operands ---------------------------------------------------------------------------------------------


@_kink(aten.maximum, aten.minimum, convention="1/2 to each argument")
def _max_min_tie(c):
    """maximum/minimum with equal arguments: the backward splits the gradient 1/2, 1/2."""
    return _equal(c.args[0], c.args[1])


@_kink(aten.fmax, aten.fmin, convention="all to the first argument (torch 2.13; split 1/2 in 2.14)")
def _fmax_fmin_tie(c):
    """fmax/fmin with equal arguments: the backward gives all of the gradient to the first argument in torch 2.13,
    half to each in 2.14 (as maximum/minimum)."""
    return _equal(c.args[0], c.args[1])


@_kink(aten.l1_loss, convention="sign(0) = 0: 0 to both")
def _l1_at_target(c):
    """l1_loss where input == target (|x - y| at 0): the backward uses sign(0) = 0."""
    site = _equal(c.args[0], c.args[1])
    if site is not None:
        site.aligned = False  # the loss is reduced unless reduction="none"
    return site


@_kink(aten.smooth_l1_loss, convention="sign(0) = 0: 0 to both")
def _smooth_l1_at_target(c):
    """smooth_l1_loss with beta = 0 (then l1) where input == target: the backward uses sign(0) = 0."""
    if c.arg(3, "beta", 1.0) != 0:
        return None
    return _l1_at_target(c)


@_kink(aten.multi_margin_loss, convention="0 at the margin (the hinge's flat side)")
def _multi_margin_at_margin(c):
    """multi_margin_loss (p = 1) where a class i other than the target y sits exactly at the margin,
    margin - x[y] + x[i] = 0: max(0, .) kinks there and the backward counts a term only where it is > 0. For
    p = 2 both sides have slope 0 there (no kink). Marked at x[i]."""
    x, y = c.args[0], c.args[1]
    if not _float(x) or c.arg(2, "p", 1) != 1:
        return None
    x2 = x if x.dim() == 2 else x.reshape(1, -1)
    y2 = y.reshape(-1, 1)
    z = c.arg(3, "margin", 1.0) - x2.gather(1, y2) + x2
    at = (z == 0) & (torch.arange(x2.shape[1], device=x.device) != y2)
    return Site(at.reshape(x.shape), aligned=False)


@_kink(aten.multilabel_margin_loss_forward, convention="0 at the margin (the hinge's flat side)")
def _multilabel_margin_at_margin(c):
    """multilabel_margin_loss where 1 - x[j] + x[i] = 0 for a listed target j (the entries before the first -1)
    and a class i that is no target: max(0, .) kinks there; the backward counts a term only where it is > 0.
    Marked at x[i]."""
    x, y = c.args[0], c.args[1]
    if not _float(x):
        return None
    x2, y2 = (x, y) if x.dim() == 2 else (x.reshape(1, -1), y.reshape(1, -1))
    listed = (y2 >= 0).cumprod(1).bool()
    y2 = y2.clamp_min(0)
    is_target = torch.zeros(x2.shape, dtype=torch.long, device=x.device).scatter_add_(1, y2, listed.long()) > 0
    z = 1.0 - x2.gather(1, y2).unsqueeze(2) + x2.unsqueeze(1)  # (N, listed j, class i)
    at = ((z == 0) & listed.unsqueeze(2) & ~is_target.unsqueeze(1)).any(1)
    return Site(at.reshape(x.shape), aligned=False)


@_kink(aten.gt, aten.ge, aten.lt, aten.le, aten.eq, aten.ne, guard=True,
       convention="no gradient; a where that reads it picks one branch at a tie")
def _comparison_tie(c):
    """Comparisons with equal operands: the result flips there, so a function of it jumps."""
    return _equal(c.args[0], c.args[1])


@_kink(aten.hypot, kind="singular", convention="NaN (x / hypot(x, y) = 0 / 0)")
def _hypot_at_origin(c):
    """hypot at (0, 0): the norm of a zero vector; the backward divides by the result (NaN)."""
    x, y = c.args[0], c.args[1]
    return Site(torch.broadcast_to((x == 0) & (y == 0), torch.broadcast_shapes(x.shape, y.shape)))


def _fractional_exponent(c: OpCall) -> bool:
    """A tensor exponent, or a scalar one in (0, 1): x ** 2, x ** 0.5 ... are told apart without reading data; a
    number base only where it is 0 (0 ** p jumps, 2 ** p is smooth)."""
    x, p = c.args[0], c.arg(1, "exponent")
    if not isinstance(x, Tensor):
        return x == 0
    if maybe_power_cut(x, p):  # z ** 1.5, z ** (0.5 + 0j) (float_power), x ** 0.5j
        return True
    return isinstance(p, Tensor) or (isinstance(p, (int, float)) and 0 < p < 1)


@_kink(aten.pow, aten.float_power, kind="singular", convention="Inf (p x^(p-1) at 0)",
       possible=_fractional_exponent, reads_numbers=True)
def _fractional_power_at_zero(c):
    """x ** p with 0 < p < 1 at x = 0: an infinite derivative (Inf from the backward). With a tensor exponent
    (x a tensor or a number, ``0.0 ** p``), 0 ** p jumps at p = 0 (1 there, 0 above, Inf below); PyTorch's
    derivative in p is 0 there. A complex power on its branch cut (`_cuts.power_cut`: any overload, float_power's
    complex exponent too) jumps."""
    x, p = c.args[0], c.arg(1, "exponent")
    if (cut := power_cut(x, p)) is not None:
        return Site(cut, kind="jump", convention="PyTorch's formula on the branch cut")
    if isinstance(p, Tensor) and _float(p) and (_float(x) or (not isinstance(x, Tensor) and x == 0)):
        zero = x == 0 if isinstance(x, Tensor) else torch.ones((), dtype=torch.bool, device=p.device)
        shape = torch.broadcast_shapes(p.shape, *((x.shape,) if isinstance(x, Tensor) else ()))
        if bool((zero & (p == 0)).any()):
            return Site(torch.broadcast_to(zero & (p == 0), shape), kind="jump",
                        convention="0 to p (0 ** p jumps at p = 0)")
    if not _float(x) or (isinstance(p, Tensor) and p.is_complex()):  # (x ** p with a complex p: its cut, above)
        return None
    if isinstance(p, Tensor):
        return Site(torch.broadcast_to((x == 0) & (p > 0) & (p < 1), torch.broadcast_shapes(x.shape, p.shape)))
    if not isinstance(p, (int, float)) or not 0 < p < 1:
        return None
    return Site(x == 0, convention=f"Inf (p x^(p-1) at 0, p = {p})")


@_kink(aten.sqrt, aten.rsqrt, kind="singular", convention="Inf (1 / (2 sqrt(0)); -Inf for rsqrt)")
def _sqrt_at_zero(c):
    """sqrt/rsqrt at 0: an infinite derivative; the backward divides by 2 sqrt(0) (Inf, NaN under a zero
    sensitivity). A complex z also on the negative real axis, where the result's imaginary part changes sign (a
    jump: `_cuts.on_branch_cut`)."""
    x = c.args[0]
    if (cut := on_branch_cut("sqrt", x)) is not None:
        return Site(cut, kind="jump")
    return _where_zero(c)


@_kink(aten.xlogy, aten.special_xlog1py, kind="singular", convention="0 to x at x = 0 (log y to x elsewhere)")
def _xlogy_at_the_origin(c):
    """xlogy(x, y) = x log y (0 where x = 0) at x = 0, y = 0 (xlog1py: y = -1): x log y there is 0 along y but
    -Inf for any x > 0 (t log t: an infinite slope, NaN for x < 0); the backward gives x 0 there."""
    x, y = c.args[0], c.args[1]
    if not _float(x):  # (a number x: 0 log y is 0 for every y)
        return None
    at = (x == 0) & (y == (-1 if c.packet.startswith("special_xlog1py") else 0))
    shape = torch.broadcast_shapes(*(t.shape for t in (x, y) if isinstance(t, Tensor)))
    return Site(torch.broadcast_to(at, shape))


@_kink(aten.special_entr, kind="singular", convention="Inf (-(1 + log x) at 0)")
def _entr_at_zero(c):
    """entr(x) = -x log x at 0: an infinite slope (Inf from the backward), -Inf for x < 0."""
    return _where_zero(c) if _float(c.args[0]) else None


@_kink(aten.asin, aten.acos, kind="singular", convention="Inf (1 / sqrt(1 - x^2) at ±1)")
def _arcsin_at_one(c):
    """asin/acos at ±1: an infinite derivative (Inf from the backward). A complex z: their branch cuts, the real
    axis beyond ±1, where the result jumps."""
    x = c.args[0]
    if (cut := on_branch_cut("asin", x)) is not None:
        return Site(cut, kind="jump")
    return Site(x.abs() == 1)


# -- steps (jumps) --------------------------------------------------------------------------------------------


@_kink(aten.floor, aten.ceil, aten.trunc, kind="jump", convention="0, as on both sides")
def _step_at_integer(c):
    """floor/ceil/trunc jump at the integers; the backward is 0 everywhere."""
    x = c.args[0]
    return Site(_integral(x)) if _float(x) else None


@_kink(aten.frac, kind="jump", convention="1, as on both sides")
def _frac_at_integer(c):
    """frac jumps at the integers; the backward is 1 everywhere."""
    x = c.args[0]
    return Site(_integral(x)) if _float(x) else None


@_kink(aten.round, kind="jump", convention="0, as on both sides")
def _round_at_half(c):
    """round jumps halfway between the numbers it rounds to (x.5, or x.5 * 10**-decimals); the backward is 0."""
    x = c.args[0]
    if not _float(x):
        return None
    decimals = c.arg(1, "decimals", 0)
    y = x * 10.0**decimals if decimals else x
    return Site(y - y.floor() == 0.5)


@_kink(aten.grid_sampler_2d, aten.grid_sampler_3d, convention="the gradient of the cell on one side")
def _grid_sample_on_a_pixel(c):
    """Bilinear (trilinear) sampling is piecewise linear in the sample point, with a kink wherever a coordinate of
    it is a pixel's (an integer once unnormalised, as the kernel does); nearest sampling jumps halfway between
    pixels; border and reflection padding clip (or fold) the coordinates at the edges. Only a grid that depends on
    f's inputs can kink: the output is linear in the image (an identity grid sits on pixel centres)."""
    image, grid = c.args[0], c.args[1]
    if not _float(grid) or not grid.requires_grad:
        return None
    mode, padding, align = c.arg(2, "interpolation_mode", 0), c.arg(3, "padding_mode", 0), c.arg(4, "align_corners")
    sizes = image.shape[-1:-(grid.shape[-1] + 1):-1]  # W, H (, D): grid[..., 0] indexes the last dim
    coords = [((grid[..., i] + 1) / 2) * (n - 1) if align else ((grid[..., i] + 1) * n - 1) / 2
              for i, n in enumerate(sizes)]
    halves = mode == 1 or (padding == 2 and not align)  # nearest: jumps; reflection folds at -0.5 and n - 0.5
    edges = mode == 0 or padding in (1, 2)  # bilinear kinks at every pixel; bicubic at clipped edges only
    if not halves and not edges:
        return None

    def hit(x: Tensor, n: int) -> Tensor:
        if mode == 0:
            m = _integral(x)
        elif edges:
            m = (x == 0) | (x == n - 1)
        else:
            m = torch.zeros_like(x, dtype=torch.bool)
        return m | _integral(x - 0.5) if halves else m

    mask = torch.stack([hit(x, n) for x, n in zip(coords, sizes, strict=True)]).any(0)
    return Site(mask, aligned=False, kind="jump" if mode == 1 else "kink")


# -- selections: reductions, order statistics, pooling ---------------------------------------------------------


@_kink(aten.amax, aten.amin, needs_out=True, guard=True, convention="split evenly among ties")
@_kink(aten.max, aten.min, aten.argmax, aten.argmin, aten.aminmax, needs_out=True, convention="split evenly among ties")
def _extreme_tie(c):
    """max/min/amax/amin/aminmax/argmax/argmin with tied extremes (in a slice): max(dim)/min(dim) give all of the
    gradient to the returned (first) index; max()/amax/aminmax and their min versions split it evenly among the
    tied elements; argmax/argmin return an index (no gradient), which then picks the first. amax and amin are
    guards in PyTorch's own code (``guard``)."""
    x, out, name = c.args[0], c.out, c.packet.rstrip("_")
    if len(c.args) > 1 and isinstance(c.args[1], Tensor):
        return _max_min_tie(c)  # binary max(x, y)
    if not _float(x) or x.numel() < 2:
        return None
    if name == "aminmax":
        dim, keepdim = c.kwargs.get("dim"), c.kwargs.get("keepdim", False)
        mask = _slice_ties(x, out[0], dim, keepdim) | _slice_ties(x, out[1], dim, keepdim)
        return Site(mask, aligned=False)
    dim, keepdim = c.arg(1, "dim", None), c.arg(2, "keepdim", False)
    if name in ("argmax", "argmin"):
        value = (x.amax if name == "argmax" else x.amin)(*(() if dim is None else (dim,)), keepdim=keepdim)
        return Site(_slice_ties(x, value, dim, keepdim), aligned=False,
                    convention="an index (no gradient): what reads it follows the first")
    if isinstance(out, Tensor):
        return _tied_slices(x, out, dim, keepdim)
    site = _tied_slices(x, out[0], dim, keepdim)
    site.convention = "all to the returned (first) index"
    return site


@_kink(aten.median, aten.nanmedian, aten.kthvalue, aten.mode, needs_out=True, convention="all to the returned index")
def _order_statistic_tie(c):
    """median/kthvalue/mode with ties at the selected value: all to the returned index (median() with no dim
    splits evenly)."""
    x, out = c.args[0], c.out
    if not _float(x):
        return None
    if isinstance(out, Tensor):
        site = _tied_slices(x, out, None, False)
        site.convention = "split evenly among ties"
        return site
    i = 2 if c.packet == "kthvalue" else 1
    return _tied_slices(x, out[0], c.arg(i, "dim", -1), c.arg(i + 1, "keepdim", False))


@_kink(aten.sort, needs_out=True, convention="follows the returned positions")
def _sort_tie(c):
    """sort with equal values in a slice: the gradient follows the positions sort returned (ties keep their
    order). The tied elements are marked where they sit in the input."""
    values, perm = c.out[0], c.out[1]
    dim = c.arg(1, "dim", -1)
    if isinstance(dim, bool):  # sort.stable(x, *, stable, dim)
        dim = c.kwargs.get("dim", -1)
    if not _float(values) or values.dim() == 0 or values.shape[dim] < 2:
        return None
    n = values.shape[dim] - 1
    tie = (values.narrow(dim, 0, n) == values.narrow(dim, 1, n)).to(torch.uint8)
    return Site(_in_input(values, dim, [(perm.narrow(dim, 0, n), tie), (perm.narrow(dim, 1, n), tie)]),
                aligned=False, reads=lambda: _both_sides(tie, dim))


@_kink(aten.topk, needs_out=True, convention="all to the returned indices")
def _topk_tie(c):
    """topk with ties among, or at the edge of, the selected values: all to the returned indices. The tied
    elements are marked where they sit in the input."""
    x, values, idx = c.args[0], c.out[0], c.out[1]
    dim = c.arg(2, "dim", -1)
    if not _float(x) or values.numel() == 0 or values.dim() == 0:
        return None
    k = values.shape[dim]
    last = values.narrow(dim, k - 1, 1)
    edge = (x == last).sum(dim, keepdim=True) > (values == last).sum(dim, keepdim=True)
    mask = (x == last) & edge  # every element equal to the last value kept, when not all of them are kept
    inner = None
    if k > 1:
        inner = (values.narrow(dim, 0, k - 1) == values.narrow(dim, 1, k - 1)).to(torch.uint8)
        mask = mask | _in_input(x, dim, [(idx.narrow(dim, 0, k - 1), inner), (idx.narrow(dim, 1, k - 1), inner)])

    def reads() -> Tensor:  # the kept values tied with the edge, and the tied neighbours among them
        at_edge = (values == last) & edge
        return at_edge if inner is None else at_edge | _both_sides(inner, dim)

    return Site(mask, aligned=False, reads=reads)


@_kink(aten.cummax, aten.cummin, needs_out=True, convention="all to the returned (last) index")
def _running_extreme_tie(c):
    """cummax/cummin where an element equals the running extreme before it (then every later output whose value
    it is has a tie): all to the returned index, the last of the tied. Marked at the element."""
    x, values = c.args[0], c.out[0]
    dim = c.arg(1, "dim")
    if not _float(x) or x.dim() == 0 or x.shape[dim] < 2:
        return None
    n = x.shape[dim] - 1
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    mask.narrow(dim, 1, n).copy_(x.narrow(dim, 1, n) == values.narrow(dim, 0, n))

    def reads() -> Tensor:  # outputs whose value a tie holds: the running extreme of the tied values equals them
        fill = -math.inf if c.packet.startswith("cummax") else math.inf
        tied = torch.where(mask, values, fill)
        return (tied.cummax(dim) if fill < 0 else tied.cummin(dim)).values == values

    return Site(mask, aligned=False, reads=reads)


@_kink(aten.scatter_reduce, aten.index_reduce, needs_out=True, convention="split evenly among ties")
def _reduce_ties(c):
    """scatter_reduce / index_reduce with amax or amin: more than one element (the destination's own with
    include_self) equals a group's result. Other reductions are smooth (sum, mean) or no kinks (prod)."""
    reduce = c.arg(4, "reduce")
    dest, dim, index, src, out = c.args[0], c.args[1], c.args[2], c.args[3], c.out
    if reduce not in ("amax", "amin") or not _float(src):
        return None
    if c.packet.startswith("index_reduce") and index.dim() == 1:  # one index per slice along dim
        shape = [1] * src.dim()
        shape[dim] = -1
        index = index.view(shape).expand(src.shape)
    hits = (src == out.gather(dim, index)).to(out.dtype)
    count = torch.zeros_like(out).scatter_add_(dim, index, hits)
    if c.arg(5, "include_self", True):
        count += dest == out
    return Site(count > 1)
