"""PyTorch's op database (``op_db``) moved onto its kinks, through gradwise's nonsmooth calculus.

For every op whose samples reach an aten op that gradwise knows kinks or jumps (``KINK_RULES`` or the facts of
``gradwise._ops._kinks.KINKS``), each float64 sample is *quantized* (its floating tensors rounded to a grid of 0.5
or 1): that puts elements on ties with each other and with the other operands, on 0, on integer clamp bounds and
pooling-window ties, without a hand-written case per op. Along random directions (Gaussian, and integer ones whose
tangents tie too) ``gw.directional_derivative`` is compared with float64 one-sided differences at several steps
(and their Richardson extrapolations). Outcomes per (sample, direction):

* ``ok``: some difference quotient agrees with gradwise's value, elementwise.
* ``refused at a jump``: gradwise raised ``NonsmoothError`` where the differences show f jumping (or an infinite
  slope: the change does not shrink linearly with the step).
* ``refused``: gradwise raised ``NonsmoothError`` where f looks continuous (a needless refusal, never a wrong
  number: counted, not a failure).
* ``silent at a jump``: a finite number where f jumps: a failure.
* ``wrong``: a number no difference quotient supports: a failure.
* ``crash``: any other exception from gradwise: a failure.

Optionally (``gradcheck=n``: the first n samples) ``gw.gradcheck`` runs on a weighted sum of the outputs at the
same point: it must not raise anything but ``NonsmoothError`` (its verdicts are counted).
"""
from __future__ import annotations

import functools
import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

import gradwise as gw
from _opdb import _leaves, op_db, op_id, op_skip_reason, samples
from gradwise import NonsmoothError
from gradwise._nonsmooth import KINK_RULES
from gradwise._ops._kinks import KINKS

D = torch.float64
GRIDS = (0.5, 1.0)
STEPS = (1e-3, 1e-4, 1e-5, 1e-6)
FAILURES = ("silent at a jump", "wrong", "crash")


class _Reached(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


# op_db's svd samples read singular vectors through ``.abs()`` (gauge-invariant: LAPACK may flip a vector's
# sign). On a quantized matrix many of their entries are 0 in exact arithmetic but come out as +-1e-15, 1e-16 off
# abs's kink: gradwise differentiates the float piece (-u' for -3e-15, docs/nonsmooth.md "Near a kink"), the
# differences at steps >= 5e-7 see |u'|. Squaring keeps the gauge invariance and makes that slope 2|u| u' ~ 0 on
# both sides, while the entries away from 0 are still checked.
# linalg.eigh's samples read eigenvectors the same way (``out_fn``: values, abs(vectors)), with the same entries
# 1e-16 off 0 (eigenvectors of integer matrices at eigenvalues +-1 have exact zeros): squared too.
_SQUARED_ABS = {"svd", "linalg.svd"}


def _gauge_free(op, process):
    if op.name == "linalg.eigh" and process.__name__ == "out_fn":
        return lambda out: (lambda o: (o[0], o[1].square()) if isinstance(o, tuple) else o)(process(out))
    if op.name not in _SQUARED_ABS or process.__name__ not in ("fn_U", "fn_Vh"):
        return process
    return lambda out: tuple(o.square() for o in process(out)) if process.__name__ == "fn_Vh" \
        else process(out).square()


def _near_a_tie(op, leaves) -> bool:
    """Whether a quantized svd sample has singular values tied (or 0) in exact arithmetic that rounding moved
    1e-16 apart: the singular vectors jump there and the values have kinks, which the float point does not hit
    (gradwise treats exact ties only), but the differences see."""
    if op.name not in _SQUARED_ABS or not isinstance(leaves[0], torch.Tensor) or leaves[0].numel() == 0:
        return False
    for full in (True, False):  # (the svd's own values: svdvals may tie exactly where they are 1 ulp apart)
        sv = torch.linalg.svd(leaves[0].detach(), full_matrices=full)[1]
        gaps = torch.cat([(sv[..., :-1] - sv[..., 1:]).reshape(-1), sv[..., -1:].reshape(-1)])
        if ((gaps > 0) & (gaps < 1e-10 * (1 + sv.abs().max()))).any():
            return True
    return False


def _call_sample(op, sample, leaves, spec):
    inp, args, kwargs = tree_unflatten(leaves, spec)
    torch.default_generator.manual_seed(0)
    out = _gauge_free(op, sample.output_process_fn_grad)(op.gradcheck_wrapper(op.get_op(), inp, *args, **kwargs))
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return torch.cat([o.reshape(-1) for o in outs]) if outs else None


@functools.cache
def kink_ops() -> dict[str, object]:
    """op id -> OpInfo, for the ops whose first float64 sample reaches an aten op with a kink rule or kink fact."""
    known = set(KINK_RULES) | set(KINKS)
    found = {}
    for op in op_db():
        if op_skip_reason(op) or D not in op.supported_backward_dtypes("cpu"):
            continue
        try:
            first = next(iter(samples(op, D, 1)), None)
        except Exception:  # (a sample generator PyTorch cannot run here)
            continue
        if first is None:
            continue
        leaves, spec = _leaves(first)
        reached = _Reached()
        try:
            with reached:
                _call_sample(op, first, leaves, spec)
        except Exception:  # (the op refuses its own sample on CPU)
            continue
        if reached.seen & known:
            found[op_id(op)] = op
    return found


def op_by_id(name: str):
    return next(op for op in op_db() if op_id(op) == name)


def _quantized(leaves: list, grid: float) -> list:
    return [(t.detach() / grid).round() * grid if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in leaves]


def _directions(xs, n_gauss: int, n_int: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for k in range(n_gauss + n_int):
        ds = [torch.randn(x.shape, generator=g, dtype=D) for x in xs]
        yield tuple(d.round() if k >= n_gauss else d for d in ds)


def one_sided(f, xs, ds):
    """(difference quotients (f(x + t d) - f(x)) / t and Richardson's 2 D(t / 2) - D(t) for t in STEPS, elementwise
    jump mask: the change at t = 5e-7 is not 5x smaller than at 5e-6 (a jump, or an infinite slope))."""
    with torch.no_grad():
        f0 = f(*xs)
        at = {t: f(*[x + t * d for x, d in zip(xs, ds, strict=True)]) for t in (*STEPS, *(s / 2 for s in STEPS))}
    q = {t: (v - f0) / t for t, v in at.items()}
    quotients = [q[t] for t in STEPS] + [q[t / 2] for t in STEPS] + [2 * q[t / 2] - q[t] for t in STEPS]
    small, big = (at[5e-7] - f0).abs(), (at[5e-6] - f0).abs()
    return quotients, (small > 1e-9 * (1 + f0.abs())) & (small > 0.2 * big)


@dataclass
class SweepResult:
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def sweep_op(op, *, limit: int | None = 2, grids=GRIDS, n_gauss: int = 3, n_int: int = 2,
             gradcheck: int = 0) -> SweepResult:
    """The sweep over ``op``'s first ``limit`` samples (all: None); ``gradcheck``: gw.gradcheck at the first that
    many samples, on the first grid (it costs seconds per call)."""
    r = SweepResult()
    for si, sample in enumerate(samples(op, D, limit)):
        leaves, spec = _leaves(sample)
        idx = [i for i, t in enumerate(leaves)
               if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
        if not idx or any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in leaves):
            continue
        for grid in grids:
            q = _quantized(leaves, grid)

            def f(*xs, q=q, sample=sample, idx=idx, spec=spec):
                ls = list(q)
                for i, x in zip(idx, xs, strict=True):
                    ls[i] = x
                return _call_sample(op, sample, ls, spec)

            xs = tuple(q[i] for i in idx)
            if any(x.dtype != D for x in xs):  # (cov's float32 aweights: differences at float32 precision)
                r.counts["sample left out"] += 1
                continue
            if _near_a_tie(op, q):
                r.counts["sample left out: 1e-16 off a tie"] += 1
                continue
            try:
                with torch.no_grad():
                    y0, y1 = f(*xs), f(*xs)
            except Exception:  # (plain torch refuses the quantized sample)
                r.counts["sample refused by torch"] += 1
                continue
            if y0 is None or y0.numel() == 0 or y0.dtype != D or not torch.isfinite(y0).all() \
                    or not torch.equal(y0, y1):
                r.counts["sample left out"] += 1
                continue
            if not all(bool(torch.isfinite(x).all()) for x in xs):  # (nanmean's NaN samples): no derivative there
                r.counts["sample with NaN/Inf input"] += 1
                outcome, msg = _refuses_non_finite(f, xs)
                r.counts[outcome] += 1
                if outcome in FAILURES:
                    r.failures.append(f"{op_id(op)} sample {si}, grid {grid}: {outcome}: {msg}")
                continue
            r.counts["samples"] += 1
            for di, ds in enumerate(_directions(xs, n_gauss, n_int, 7 * si + int(10 * grid))):
                where = f"sample {si}, grid {grid}, direction {di}"
                try:
                    quotients, jump = one_sided(f, xs, ds)
                except Exception:  # (torch refuses a moved point: cov's negative weights)
                    r.counts["differences refused by torch"] += 1
                    continue
                if not all(torch.isfinite(v).all() for v in quotients):
                    r.counts["differences not finite"] += 1
                    continue
                r.counts["directions"] += 1
                outcome, msg = _check(f, xs, ds, quotients, jump)
                r.counts[outcome] += 1
                if outcome in FAILURES:
                    r.failures.append(f"{op_id(op)} {where}: {outcome}: {msg}")
            if si < gradcheck and grid == grids[0]:
                _gradcheck(op, f, xs, y0, r, f"sample {si}, grid {grid}")
    return r


def _refuses_non_finite(f, xs) -> tuple[str, str]:
    """gradwise must refuse a NaN/Inf input with its ValueError naming the count (API contract: no derivative at a
    non-finite point); any other exception is a crash, a number is silent."""
    ds = tuple(torch.ones_like(x) for x in xs)
    try:
        got = gw.directional_derivative(f, xs, ds)
    except ValueError as e:
        if "NaN/Inf value(s)" in str(e):
            return "refused: non-finite input", ""
        return "crash", f"ValueError: {str(e).splitlines()[0][:160]}"
    except Exception as e:
        return "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return "wrong", f"a derivative at a non-finite input: {got.reshape(-1)[:4]}"


def _check(f, xs, ds, quotients, jump) -> tuple[str, str]:
    try:
        got = gw.directional_derivative(f, xs, ds)
    except NonsmoothError as e:
        return ("refused at a jump" if bool(jump.any()) else "refused"), str(e).splitlines()[0][:160]
    except Exception as e:  # (what the sweep looks for)
        return "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    got = got.reshape(-1).to(D)
    bad = torch.ones_like(got, dtype=torch.bool)
    if bool(jump.any()):
        narrow = _narrow_smooth(f, xs, ds, got)
        if bool((jump & ~narrow).any()):
            jump &= ~narrow
            return "silent at a jump", f"{int(jump.sum())} element(s) jump, gradwise gave {got[jump][:4]}"
        bad &= ~narrow  # (the steps of the other quotients leave the piece too)
    for est in quotients:
        bad &= ~((got - est).abs() <= 1e-5 * (1 + est.abs()))
    # a Hölder term (|x|^1.5 at 0: the quotients' error shrinks like t^0.5) converges too slowly for that: the
    # quotients at the decreasing steps must approach gradwise's value monotonically, and come close
    err = [(got - q).abs() for q in quotients[: len(STEPS)]]
    approach = torch.stack([a > b for a, b in itertools.pairwise(err)]).all(0)
    bad &= ~(approach & (err[-1] < err[0] / 20) & (err[-1] <= 1e-2 * (1 + got.abs())))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        return "wrong", f"element {i}: gradwise {float(got[i]):.6g}, differences " \
                        f"{[round(float(v[i]), 6) for v in quotients[:4]]}"
    return "ok", ""


TINY = (1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13, 1e-14)  # (not below: 1e-16 off a tie is no piece)


def _narrow_smooth(f, xs, ds, got):
    """Elements whose smooth piece at x is narrower than the steps (f changes piece within 5e-6: a p = -1
    pairwise distance's eps 1e-6 moves past 0; normalize's clamp_min(eps = 1e-12) of a norm at 0, slope d / eps,
    or 0 where the norm is a min over a 0 entry), where the jump test's steps see a jump that is not at x. Such an
    element has two consecutive tiny steps whose quotients agree with gradwise's value, up to f(x)'s rounding
    (4 eps |f(x)| / t: f(x) = 9e12 there, its change at 1e-14 is lost), one of them informative (a nonzero change,
    or every input moved). A true jump J > 1e-9 (1 + |f(x)|) cannot: J / t changes tenfold per step, and a change
    lost to rounding next to J / t bounds J by 44 eps |f(x)|. Only for the jump test: a number no step supports
    stays wrong."""
    eps = torch.finfo(D).eps
    with torch.no_grad():
        f0 = f(*xs)
        agree = []
        for t in TINY:
            moved = [x + t * d for x, d in zip(xs, ds, strict=True)]
            c = f(*moved) - f0
            all_moved = all(bool(((m != x) | (d == 0)).all()) for m, x, d in zip(moved, xs, ds, strict=True))
            close = (got - c / t).abs() <= 1e-5 * (1 + got.abs()) + 4 * eps * f0.abs() / t
            agree.append((close, (c != 0) | all_moved))
    return torch.stack([a & b & (i | j) for (a, i), (b, j) in itertools.pairwise(agree)]).any(0)


def _gradcheck(op, f, xs, y0, r: SweepResult, where: str) -> None:
    w = torch.linspace(-1.0, 1.0, y0.numel(), dtype=D) + 0.37  # a weighted sum: every output counts
    g = torch.Generator().manual_seed(0)
    try:  # gradcheck evaluates f at nearby points: f must be defined there (a BCE target leaves [0, 1])
        with torch.no_grad():
            f(*[x + 1e-3 * torch.randn(x.shape, generator=g, dtype=D) for x in xs])
    except Exception:  # (a BCE target moved out of [0, 1])
        r.counts["gradcheck: f undefined near x"] += 1
        return
    scalar = lambda *a: (f(*a) * w).sum()
    try:
        res = gw.gradcheck(scalar, xs, raise_exception=False)
    except NonsmoothError:
        r.counts["gradcheck refused"] += 1
        return
    except Exception as e:  # (what the sweep looks for)
        r.counts["gradcheck crash"] += 1
        r.failures.append(f"{op_id(op)} {where}: gradcheck crash: {type(e).__name__}: {str(e)[:160]}")
        return
    r.counts[f"gradcheck {'passed' if res.passed else 'failed'}{' at a kink' if res.kink else ''}"] += 1


if __name__ == "__main__":  # python tests/_kink_sweep.py [LIMIT]: the counts, op by op, and every failure
    import sys
    import warnings

    warnings.simplefilter("ignore")
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else None
    total, failures = Counter(), []
    for name, op in kink_ops().items():
        r = sweep_op(op, limit=limit, gradcheck=1)
        total += r.counts
        failures += r.failures
        print(name, dict(r.counts), flush=True)
    print("total", dict(total))
    print("\n".join(failures))
