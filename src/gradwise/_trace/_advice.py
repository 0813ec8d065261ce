"""What the trace says: why a NaN/Inf was born (``_EXPLAIN``: one explainer per op family, ``_explain``) and
the fix texts its findings carry (``_GENUINE_FIX``, ``_UNDECIDED``, ``_GRADIENT_FIX``,
``_INPUT_FIX``, ``_SEED_FIX``, ``_KINK_FIX``, ``_SINGULAR_FIX``, the factorisations' own: ``kink_fix``; the fix per
discarding op, ``_SELECT_FIX`` among them, is ``_facts._DISCARDS``).

May import: torch, gradwise._trace._common, gradwise._trace._facts.
"""

from __future__ import annotations

import torch

from gradwise._trace._common import _aligned, _nan_in, _nonfinite, _op_name, aten
from gradwise._trace._facts import _LITERALS, _OVERFLOWS, WRITTEN, WRITTEN_MASK

_EXPLAIN: dict = {}  # op (an overload where it differs: pow.Scalar's tensor is the exponent) -> explainer
OVERFLOW = "overflow"  # how an overflow's explanation starts (its fix: _OVERFLOW_FIX)
NUMBER = "a NaN/Inf number"  # how the explanation of a NaN/Inf Python argument starts (its fix: _NUMBER_FIX)


def number_passed(op: str, value: float) -> str:
    """The explanation of a NaN/Inf made by a NaN/Inf Python number among the op's arguments."""
    return f"{NUMBER} ({value}) passed to {op} (a Python float argument, not a tensor)"


def _explains(*ops):
    def register(fn):
        for op in ops:
            _EXPLAIN[op] = fn
        return fn

    return register


def _inputs_at(ins, mask):
    """The first input's values at the masked positions, when positions line up."""
    if ins and ins[0].is_floating_point() and _aligned(ins[:1], mask.shape):
        return ins[0].broadcast_to(mask.shape)[mask]
    return None


def _infinite_at(ins, mask) -> bool:
    """Whether a floating input is non-finite at the elements ``mask`` (anywhere, where positions do not line up)."""
    tensors = [t for t in ins if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if mask is not None and tensors and _aligned(tensors, mask.shape):
        return any(bool((~torch.isfinite(t)).broadcast_to(mask.shape)[mask].any()) for t in tensors)
    return any(_nonfinite(t) for t in tensors)


def _log_counts(ins, mask, edge: float, name: str) -> str:
    x = _inputs_at(ins, mask)
    if x is not None and x.numel():
        below, at = int((x < edge).sum()), int((x == edge).sum())
        return (f"{name} of {below} value(s) below {edge:g} and {at} at {edge:g}: a domain error (NaN below the "
                f"domain, -inf at {edge:g})")
    return f"{name} outside its domain (NaN below {edge:g}, -inf at {edge:g})"


@_explains(aten.log, aten.log2, aten.log10, aten.xlogy)
def _log_domain(ins, out, mask) -> str:
    """log is NaN below its domain and -inf at its edge, 0."""
    return _log_counts(ins, mask, 0.0, "log")


@_explains(aten.log1p)
def _log1p_domain(ins, out, mask) -> str:
    """log1p is NaN below -1 and -inf at -1."""
    return _log_counts(ins, mask, -1.0, "log1p")


@_explains(aten.nll_loss_forward, aten.nll_loss2d_forward)
def _nll_total_weight(ins, out, mask) -> str:
    """nll_loss with reduction='mean' divides by the total weight of the targets."""
    return ("the total weight of the targets is 0 (every target ignored or of class weight 0): reduction='mean' "
            "divides 0 by 0")


@_explains(aten.sqrt, aten.rsqrt)
def _sqrt_domain(ins, out, mask) -> str:
    """sqrt / rsqrt are NaN for negative inputs; rsqrt is inf at 0."""
    x = _inputs_at(ins, mask)
    if x is not None and x.numel():
        return f"root of {int((x < 0).sum())} negative value(s) (NaN) and {int((x == 0).sum())} zero(s)"
    return "a root outside its domain (NaN for negatives)"


def _exceeds(out) -> str:
    return f"{OVERFLOW}: the result exceeds the largest {str(out.dtype).replace('torch.', '')} (Inf)" \
        if out is not None else OVERFLOW


@_explains(aten.pow)
def _power(ins, out, mask) -> str:
    """A power is NaN for a negative base to a fractional power and inf for a negative power of 0; any other
    Inf from finite values is an overflow (x ** 2 of a value above sqrt(largest float))."""
    x = _inputs_at(ins, mask)  # the base (pow.Scalar, c ** x, is _exponential's)
    if x is None or not x.numel() or out is None:
        return "a power outside its domain"
    at = out.broadcast_to(mask.shape)[mask]
    nan, zero = int(at.isnan().sum()), int((at.isinf() & (x == 0)).sum())
    big = int(at.isinf().sum()) - zero
    if not nan and not zero:
        return _exceeds(out)
    said = f"{int((x < 0).sum())} negative and {int((x == 0).sum())} zero base(s): NaN for a negative base, " \
           "inf for a negative power of 0"
    return said + (f"; {big} overflow(s) (the result exceeds the largest float)" if big else "")


@_explains(aten.pow.Scalar)
def _exponential(ins, out, mask) -> str:
    """c ** x: Inf from finite exponents is an overflow (a base above 1 in magnitude to a large power, or below 1
    to a large negative one) or 0 to a negative power, told apart by the exponents' sign (the base c is a number,
    not among ``ins``); NaN is a negative c to a fractional power."""
    if out is not None and _nan_in(out, mask):
        return "a negative base to a fractional power (NaN)"
    x = _inputs_at(ins, mask)  # the exponents
    if x is not None and x.numel() and bool((x > 0).all()):  # (0 ** x and |c| < 1 give no Inf there)
        return f"{_exceeds(out)}: a base above 1 in magnitude raised to a large power"
    return f"{_exceeds(out)}: a base below 1 in magnitude raised to a large negative power, or 0 to a negative power"


@_explains(aten.div, aten.reciprocal)
def _division(ins, out, mask) -> str:
    """x/0 is ±inf and 0/0 is NaN; inf/inf is NaN (an overflow upstream). Judged at the elements ``mask`` where the
    positions line up: a 0/0 beside an Inf elsewhere in the same operand was told "inf / inf"."""
    if _infinite_at(ins, mask):
        return "inf / inf (both operands overflowed upstream)"
    return "division by zero (x/0 = ±inf, 0/0 = NaN)"


# an optimizer's update divides by sqrt(v) + eps: 0 / 0 where a parameter's gradient was always 0 and eps is 0
_UPDATE_DIVISIONS = [aten.addcdiv, aten.addcdiv_, aten._foreach_addcdiv, aten._foreach_addcdiv_, aten._fused_adam_,
                     aten._fused_adamw_]


@_explains(*_UPDATE_DIVISIONS)
def _update_division(ins, out, mask) -> str:
    """addcdiv (x + v * a / b) and the fused Adam updates divide: by 0 where b (sqrt(v) + eps) is 0."""
    if any(isinstance(t, torch.Tensor) and t.is_floating_point() and _nonfinite(t) for t in ins):
        return "NaN from infinite inputs (inf / inf or 0 x inf in the update: an Inf gradient or state upstream)"
    return ("division by zero in an update (a / b with b = 0: 0/0 = NaN; Adam-style optimizers divide by "
            "sqrt(v) + eps, 0 where a parameter's gradient has always been 0 and eps is 0)")


# (and the in-place arithmetic of an optimizer's update: a parameter that overflows)
@_explains(*(_OVERFLOWS - {aten.pow}), aten.add_, aten.sub_, aten.mul_, aten.addcmul, aten.addcmul_)
def _overflow(ins, out, mask) -> str:
    """Inf from finite inputs is an overflow; NaN from inf inputs is inf - inf or 0 x inf."""
    if out is not None and _nan_in(out, mask) and any(_nonfinite(t) for t in ins):
        return "inf - inf or 0 x inf"
    return _exceeds(out)


_SOFTMAX_INF = "softmax over a slice holding +inf"
FULLY_MASKED = "softmax over a slice that is entirely -inf"  # (a mask's NaN: its own root, _findings.infinities_of)


@_explains(aten._softmax, aten._log_softmax)
def _softmax_nan(ins, out, mask) -> str:
    """softmax of a slice that is all -inf is 0/0 = NaN; of a slice holding +inf, exp(inf - inf) = NaN (an
    overflow or an infinity before the softmax, not a mask)."""
    x = _inputs_at(ins, mask)
    if x is not None and bool((x == float("inf")).any()):
        return f"{_SOFTMAX_INF} (exp(inf - inf) = NaN): an overflow (or a +inf written) before the softmax"
    return f"{FULLY_MASKED} (0/0 = NaN): a fully masked row"


@_explains(aten.acos, aten.asin, aten.atanh, aten.acosh)
def _inverse_trig_domain(ins, out, mask) -> str:
    """acos/asin are NaN outside [-1, 1]; atanh is ±inf at ±1."""
    return "an inverse trigonometric/hyperbolic function outside its domain"


@_explains(aten.full, aten.fill, aten.fill_, aten.masked_fill, aten.masked_fill_, aten.lift_fresh, aten.scalar_tensor,
           aten.full_like, aten.index_put_, aten.index_put, aten.index_fill, aten.index_fill_, aten.constant_pad_nd)
def _written(ins, out, mask) -> str:
    """A NaN/Inf constant written into a tensor (data, padding, a mask value: -inf written by a masking op)."""
    mask_value = out.shape == mask.shape and bool((out[mask] == float("-inf")).all())
    return WRITTEN_MASK if mask_value else WRITTEN


@_explains(aten.copy_)
def _copied(ins, out, mask) -> str:
    """A NaN/Inf value copied into a tensor: ``x[1, 3] = -inf`` (an element's select, then copy_ of the number)
    or ``x.copy_(data)`` write data, not a mask (masks are written by masked_fill, index_put, a slice's fill_).
    Told as a mask's, its -inf explained no NaN: the used write was in no finding beside NaN padding, or "reaches:
    no gradient" where the -inf met a used +inf (sum of a row holding both)."""
    return WRITTEN



@_explains(*_LITERALS)
def _literal(ins, out, mask) -> str:
    """torch.tensor([..., nan]): a NaN/Inf written in a tensor literal."""
    return "a NaN/Inf written in a tensor literal (torch.tensor / torch.as_tensor of Python data)"


def _explain(func, ins, out, mask, number: float | None = None) -> str:
    """Why ``func`` made NaN/Inf at ``mask`` of ``out`` from ``ins``; ``number``: a NaN/Inf Python number among its
    arguments (the cause, unless the op writes constants: torch.full(..., nan) is a constant written)."""
    fn = _EXPLAIN.get(func) or _EXPLAIN.get(func.overloadpacket)
    if number is not None and fn not in (_written, _literal):
        return number_passed(_op_name(func), number)
    if fn is not None:
        return fn(ins, out, mask)
    if _infinite_at(ins, mask):
        return f"{_op_name(func)} made NaN from infinite inputs (inf - inf, inf / inf or 0 x inf)"
    return f"{_op_name(func)} made NaN/Inf from finite inputs"


_GENUINE_FIX: dict = {
    **dict.fromkeys([aten.nll_loss_forward, aten.nll_loss2d_forward],
                    "skip the batch when no target counts (weights.sum() == 0), or use reduction='sum' divided by a "
                    "count you clamp to at least 1"),
    **dict.fromkeys([aten.log, aten.log2, aten.log10, aten.log1p, aten.xlogy],
                    "keep the input inside the domain: log(x.clamp_min(eps)), or torch.special.xlogy / log_softmax"),
    **dict.fromkeys([aten.sqrt, aten.rsqrt, aten.pow],
                    "keep the base inside the domain (x.clamp_min(eps)); at 0 the derivative of sqrt is infinite: use "
                    "sqrt(x + eps) or torch.linalg.vector_norm (gradient 0 at 0)"),
    **dict.fromkeys([aten.div, aten.reciprocal],
                    "guard the denominator: x / d.clamp_min(eps) or torch.where(d != 0, ...)"),
    **dict.fromkeys(_UPDATE_DIVISIONS,
                    "keep the optimizer's eps > 0 (Adam, AdamW, RMSprop, Adagrad: it keeps the denominator of the "
                    "update away from 0), or guard the denominator of a hand-written update"),
    **dict.fromkeys([aten.exp, aten.exp2, aten.expm1, aten.sinh, aten.cosh],
                    "avoid the overflow: logsumexp / softplus / log-space arithmetic, or clamp the input"),
    **dict.fromkeys([aten._softmax, aten._log_softmax], "do not mask a whole row: keep one entry or drop the row"),
    **dict.fromkeys([aten.full, aten.fill, aten.fill_, aten.copy_, aten.masked_fill, aten.masked_fill_, aten.lift_fresh,
                     aten.full_like, aten.index_put_, aten.index_put, aten.scalar_tensor, aten.index_fill,
                     aten.index_fill_, aten.constant_pad_nd],
                    "the output reads the NaN/Inf constant written here: mask it out before the first op that uses it"),
}
# an overflow where the op's own fix is about something else (pow's domain) or there is none (mul, mm, add_)
_OVERFLOW_FIX = ("avoid the overflow: keep the values smaller (a lower learning rate, normalised inputs, gradient "
                 "clipping), compute in a wider dtype or in log space, or clamp the input")
_BACKWARD_OVERFLOW_FIX = ("a gradient overflowed: under torch.amp.GradScaler that is its loss scale being too large, "
                          "which it handles (it skips the step and lowers the scale: nothing to fix once the scale "
                          "settles); otherwise " + _OVERFLOW_FIX[len("avoid the overflow: "):])
_SOFTMAX_INF_FIX = ("keep the softmax's input finite: find where the +inf was made (an overflow: compute in log space, "
                    "e.g. logits instead of exp(logits)) or clamp it")
_NUMBER_FIX = ("the op was given a NaN/Inf Python number (float('nan'), float('inf'), math.inf): pass a finite "
               "one; where it marks entries on purpose, mask them out (torch.where / masked_fill) before anything "
               "differentiates through them")
_UNDECIDED = ("it reached {op}, which has no strong-zero rule: whether the output uses it is not known (it may "
              "be contamination that gw.strong_zeros() cannot remove there; gw.unruled_ops() lists such ops)")
_GRADIENT_FIX = ("an earlier backward left NaN/Inf in this gradient and it was used as a value (an optimizer "
                 "step writes it into the parameters); fix that backward first (see its finding), e.g. with "
                 "gw.strong_zeros() where it is contamination")
_STALE_GRADIENT_FIX = ("this .grad already held NaN/Inf when the backward added to it: zero the gradients before "
                       "each step (opt.zero_grad()), and find the earlier backward that made them (trace it too)")
_INPUT_FIX = "the data arrived with NaN/Inf: clean it (x.nan_to_num(), drop the rows) or mask it before the first op"
_UNEXPLAINED_FIX = ("run this step under gw.trace() (gradwise run without --watch) to see where the NaN/Inf was "
                    "born and whether gw.strong_zeros() removes it; skip the optimizer step when a gradient is not "
                    "finite, so that it does not reach the parameters")
_SEED_FIX = ("the seed given to backward (grad_tensors / grad_outputs) holds NaN/Inf: find where it is computed "
             "(trace that code too), or pass a finite one")


_KINK_FIX = ("not an error: the gradient here is PyTorch's convention, one element of the subdifferential. To test "
             "optimality use gw.stationarity(f, x); for an exact one-sided derivative gw.directional_derivative.")
_SINGULAR_FIX = ("an infinite derivative (a norm or root at 0): if the gradient must be finite here, smooth the op "
                 "(sqrt(x + eps), vector_norm(x + eps)), or use gw.directional_derivative / gw.generalized_grad, "
                 "which are exact there")
_TIED_SPECTRUM_FIX = ("a repeated eigenvalue or singular value: the factorisation has no differentiable branch here, "
                      "and PyTorch's gradient is that of the basis LAPACK returned (the vectors' gradients divide by "
                      "the gap between tied values: NaN/Inf). A function of the values alone (a matrix norm, an "
                      "extreme eigenvalue) gets exact one-sided derivatives from gw.directional_derivative where "
                      "gradwise has a rule for it, and NonsmoothError where it has none; do not use the vectors of "
                      "tied values")
_TIED_PIVOT_FIX = ("a tied pivot: partial pivoting chose among rows of equal magnitude, and L and U jump here (the "
                   "pivot row's entries kink, the others jump), so PyTorch's gradient is that of the row LAPACK "
                   "picked, not a derivative of a continuous function. det, solve and inv are smooth through this "
                   "point: use torch.linalg.det / solve / inv rather than the factors (gw.directional_derivative "
                   "raises NonsmoothError on the factors here)")
# kink and singular findings whose fix is not the generic one: the factorisations (``gradwise._ops._linalg``)
_FACTORISATION_FIX = {"aten._linalg_eigh": _TIED_SPECTRUM_FIX, "aten.linalg_eig": _TIED_SPECTRUM_FIX,
                      "aten._linalg_svd": _TIED_SPECTRUM_FIX, "aten.linalg_lu": _TIED_PIVOT_FIX,
                      "aten.linalg_lu_factor_ex": _TIED_PIVOT_FIX}


def kink_fix(kind: str, op: str) -> str:
    """The fix of a kink or singular finding at ``op``."""
    return _FACTORISATION_FIX.get(op) or (_KINK_FIX if kind == "kink" else _SINGULAR_FIX)


# forward ops whose backward multiplies the incoming sensitivity by a forward value: a zero they send is the
# value's zero (computed by the program), not a structural one
