"""Run PyTorch's own op database (``op_db``) through a gradient function: no-regression and contamination.

Two checks per (op, sample), both written once for every op, with no op special-cased by hand:

* ``no_regression``: on a finite sample, the candidate gradient function equals ``torch.autograd.grad`` on
  the *same* forward graph (``torch.equal`` up to the sign of zero; NaN allowed at the same positions).
* ``contamination``: pad a floating input with a NaN block along some dim (``cat([x, NaN])``), run the op,
  discard the padded part of the output (slice it off, or ``where(mask, out, 0)``) and compare the
  candidate's gradient with the gradient of the op on the unpadded sample. A padding is used only after it has
  been *validated* with plain torch on finite padding: the discarded program must reproduce the unpadded
  op's output and gradient, and with NaN padding the kept output must stay as it was. So an op whose
  output really depends on the padded block (a reduction over that dim, a contraction, ...) is never
  tried along that dim; other inputs and dims are tried instead.

Every sample or op left out gets a reason, counted in ``OpRun.skips`` so that a sweep can print them.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

# complex128: strong zeros follow complex gradients too (a complex element is a structural zero as a whole)
DTYPES = (torch.float32, torch.float64, torch.complex128)
PAD = 2  # rows of padding appended along the padded dim

GradFn = Callable[..., tuple]


class Skip(Exception):
    """A sample that cannot be checked; the message is the reason, counted as is (keep it short and fixed)."""


@functools.cache
def op_db() -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db as db
    return list(db)


def op_id(op) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def op_skip_reason(op) -> str | None:
    """Why an op is left out of every check, or None."""
    if not op.supports_autograd:
        return "op not differentiable"
    dtypes = op.supported_backward_dtypes("cpu")
    if not any(d in dtypes for d in DTYPES):
        return "no float32/float64/complex128 backward"
    return None


def samples(op, dtype: torch.dtype, limit: int | None = None) -> Iterator:
    """The op's sample inputs with requires_grad=True; the first ``limit`` ones (generation is lazy)."""
    if dtype not in op.supported_backward_dtypes("cpu"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # sample_inputs_func, not sample_inputs: the latter's tracking crawls the stack (inspect.stack) for a
        # unittest method at every sample, 10x the whole check under pytest.
        _seed(0)
        it = iter(op.sample_inputs_func(op, "cpu", dtype, True))
        i = 0
        while limit is None or i < limit:
            _seed(i)  # each sample is drawn the same way whatever ran before it
            try:
                s = next(it)
            except StopIteration:
                return
            yield s
            i += 1


def _seed(seed: int) -> None:
    # torch.manual_seed also seeds every accelerator's lazy state, and formats a stack while at it: 2 ms
    torch.default_generator.manual_seed(seed)


# -- calling a sample ------------------------------------------------------------------------------------

def _leaves(sample) -> tuple[list, object]:
    return tree_flatten((sample.input, sample.args, sample.kwargs))


def _call(op, sample, leaves: list, spec, seed: int = 0) -> list[torch.Tensor]:
    """The op's floating/complex outputs (after the sample's output processing), warnings silenced."""
    inp, args, kwargs = tree_unflatten(leaves, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _seed(seed)
        out = op.gradcheck_wrapper(op.get_op(), inp, *args, **kwargs)
        out = sample.output_process_fn_grad(out)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and _inexact(t)]
    if any(t.layout != torch.strided for t in outs):
        raise Skip("sparse output (gradwise takes dense tensors)")
    # gw.grad differentiates real outputs; a complex one enters as its real view (real and imaginary parts)
    return [torch.view_as_real(t) if t.is_complex() else t for t in outs]


def _inexact(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _weights(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fixed random cotangents so that every output element matters."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]


def _prepare(op, sample):
    """(leaves, spec, inputs) of a checkable sample, or raise Skip."""
    leaves, spec = _leaves(sample)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if any(t.layout != torch.strided for t in tensors):
        raise Skip("sparse sample")
    inputs = list({id(t): t for t in tensors if t.requires_grad}.values())
    if not inputs:
        raise Skip("no input requires grad")
    if any(_inexact(t) and not torch.isfinite(t).all() for t in tensors):
        raise Skip("non-finite sample")
    return leaves, spec, inputs


def _grads(grad_fn: GradFn, outs, inputs, weights) -> list[torch.Tensor | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(grad_fn(outs, inputs, weights, retain_graph=True, allow_unused=True))


def _zeros_for_none(gs, inputs):
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs, strict=True)]


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """torch.equal up to the sign of zero, NaN equal to NaN at the same positions; None equals None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = (t.to_dense() if t.layout != torch.strided else t for t in (a, b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a.masked_fill(na, 0), b.masked_fill(nb, 0))


# -- no regression ------------------------------------------------------------------------------------------

class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def grad_under_a_mode(*args, **kwargs) -> tuple:
    """torch.autograd.grad with a bare pass-through dispatch mode on: PyTorch's own result whenever a Python
    dispatch mode is active (a few backwards then take other kernels, e.g. masked_fill's and prod's)."""
    with _PassThrough():
        return torch.autograd.grad(*args, **kwargs)


def no_regression(op, sample, grad_fn: GradFn, reference: GradFn = torch.autograd.grad) -> str | None:
    """None when ``grad_fn`` equals ``reference`` (torch.autograd.grad) on this sample, else a failure message.

    Raises Skip for samples that cannot be checked.
    """
    leaves, spec, inputs = _prepare(op, sample)
    try:
        outs = _call(op, sample, leaves, spec)
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"sample raises in plain torch ({type(e).__name__})") from None
    outs = [o for o in outs if o.requires_grad]
    if not outs:
        raise Skip("no differentiable output")
    weights = _weights(outs)
    try:
        ref = _grads(reference, outs, inputs, weights)
        ref2 = _grads(reference, outs, inputs, weights)
    except Exception as e:
        raise Skip(f"backward raises in plain torch ({type(e).__name__})") from None
    if not all(same(a, b) for a, b in zip(ref, ref2, strict=True)):
        raise Skip("nondeterministic backward")
    try:
        got = _grads(grad_fn, outs, inputs, weights)
    except Exception as e:
        return f"raises {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if not same(g, r) and r is not None and not r.isfinite().all():
            raise Skip("plain torch gradient is non-finite (strong zeros may rightly differ)")
        if not same(g, r):
            diff = "" if g is None or r is None or g.shape != r.shape else \
                f", max |diff| {(g - r).abs().nan_to_num(math.inf).max().item():.3g}"
            return f"gradient of input {i} differs from torch.autograd.grad{diff}"
    return None


# -- contamination ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Padding:
    """Pad leaves ``positions`` along ``dim``; discard from the end (``side`` 'end') or the start."""

    positions: tuple[int, ...]
    dim: int
    side: str


def _paddings(leaves: list) -> Iterator[Padding]:
    """Every candidate: each floating leaf alone or together with the leaves of its shape, each dim."""
    seen = set()
    for i, t in enumerate(leaves):
        if not (isinstance(t, torch.Tensor) and _inexact(t) and t.dim() > 0 and t.numel() > 0):
            continue
        group = tuple(j for j, u in enumerate(leaves)
                      if isinstance(u, torch.Tensor) and _inexact(u) and u.shape == t.shape)
        for dim in range(t.dim()):
            for pos in (group, (i,)):
                for side in ("end", "start"):
                    if (pos, dim, side) not in seen:
                        seen.add((pos, dim, side))
                        yield Padding(pos, dim, side)


def _padded_leaves(leaves: list, padding: Padding, fill: float | None) -> list:
    """``cat([x, block])`` for the padded leaves; block is NaN/Inf (``fill``) or finite data from x."""
    new = list(leaves)
    for j in padding.positions:
        x = leaves[j]
        if fill is None:  # finite, in the op's domain: x's own slices, reversed and repeated
            src = x.detach().flip(padding.dim)
            reps = [1] * x.dim()
            reps[padding.dim] = -(-PAD // x.shape[padding.dim])
            block = src.repeat(reps).narrow(padding.dim, 0, PAD)
        else:
            shape = list(x.shape)
            shape[padding.dim] = PAD
            block = torch.full(shape, fill, dtype=x.dtype)
        new[j] = torch.cat([x, block], padding.dim)
    return new


def _discard(outs, ref_shapes, side: str, how: str):
    """Outputs with the padded part discarded (sliced away, or zeroed by ``where``) and each one's kept window
    ``(dim, start, length)``, None where the output did not grow."""
    kept, windows = [], []
    for o, shape in zip(outs, ref_shapes, strict=True):
        if o.shape == shape:
            kept.append(o)
            windows.append(None)
            continue
        grown = [d for d in range(o.dim()) if o.dim() == len(shape) and o.shape[d] != shape[d]]
        if len(grown) != 1 or o.shape[grown[0]] < shape[grown[0]]:
            raise Skip("output shape")
        d, n = grown[0], shape[grown[0]]
        start = 0 if side == "end" else o.shape[d] - n
        windows.append((d, start, n))
        if how == "slice":
            kept.append(o.narrow(d, start, n))
        else:
            mask = torch.zeros(o.shape[d], dtype=torch.bool)
            mask[start:start + n] = True
            kept.append(torch.where(mask.view([-1 if k == d else 1 for k in range(o.dim())]), o, 0))
    return kept, windows


def _close(a, b) -> bool:
    if a.shape != b.shape:
        return False
    return bool(torch.isclose(a, b, equal_nan=True, **_tol(a.dtype)).all())


def _tol(dtype):
    return {"rtol": 1.3e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-7, "atol": 1e-7}


@dataclass
class Contamination:
    """Outcome of one (op, sample): which padding was used and whether each gradient stayed clean."""

    padding: Padding
    torch_clean: bool
    clean: bool
    detail: str = ""


def _run_padded(op, sample, leaves, spec, inputs, padding, fill, ref_outs, weights, how, grad_fn):
    """(kept outputs, gradients) of the padded-and-discarded program."""
    outs = [o for o in _call(op, sample, _padded_leaves(leaves, padding, fill), spec) if o.requires_grad]
    if len(outs) != len(ref_outs):
        raise Skip("output count")
    kept, windows = _discard(outs, [o.shape for o in ref_outs], padding.side, how)
    if how == "where":  # the kept part gets the reference weights, the zeroed part random ones
        weights = list(weights)
        for i, win in enumerate(windows):
            if win is not None:
                gen = torch.Generator().manual_seed(1)
                big = torch.randn(kept[i].shape, generator=gen, dtype=kept[i].dtype)
                big.narrow(*win).copy_(weights[i])
                weights[i] = big
    grads = _grads(grad_fn, kept, inputs, weights)
    views = [k if win is None or how == "slice" else k.narrow(*win)
             for k, win in zip(kept, windows, strict=True)]
    return views, grads


def contamination(op, sample, grad_fn: GradFn, *, how: str = "slice", fill: float = math.nan,
                  first_only: bool = True, paddings: list[Padding] | None = None) -> list[Contamination]:
    """Try every padding (or those given) that validates on finite data; the outcome for each (just the
    first by default).

    Raises Skip when no padding of this sample can discard the padded part (or the sample is unusable).
    """
    leaves, spec, inputs = _prepare(op, sample)
    try:
        ref_outs = [o for o in _call(op, sample, leaves, spec) if o.requires_grad]
        weights = _weights(ref_outs)
        ref = _zeros_for_none(_grads(torch.autograd.grad, ref_outs, inputs, weights), inputs)
        again = _call(op, sample, leaves, spec)
        other = _call(op, sample, leaves, spec, seed=1)  # a random op draws differently
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"sample raises in plain torch ({type(e).__name__})") from None
    if not ref_outs:
        raise Skip("no differentiable output")
    if not all(same(a.detach(), b.detach()) for a, b in zip(again, other, strict=True)):
        raise Skip("random op")
    if not all(t.isfinite().all() for t in (*ref_outs, *ref)):
        # a NaN output equals any other NaN output: validating a padding against it would prove nothing
        raise Skip("non-finite output or gradient on the unpadded sample")

    results = []
    for padding in _paddings(leaves) if paddings is None else paddings:
        try:  # validate on finite padding with plain torch
            kept, g = _run_padded(op, sample, leaves, spec, inputs, padding, None, ref_outs, weights, how,
                                  torch.autograd.grad)
            if not (all(_close(k, o) for k, o in zip(kept, ref_outs, strict=True))
                    and all(_close(a, b) for a, b in zip(_zeros_for_none(g, inputs), ref, strict=True))):
                continue
            kept, g_torch = _run_padded(op, sample, leaves, spec, inputs, padding, fill, ref_outs, weights,
                                        how, torch.autograd.grad)
            if not all(_close(k, o) for k, o in zip(kept, ref_outs, strict=True)):
                continue  # NaN reaches the kept output: the output really uses it
        except Exception:
            continue
        try:
            _, g = _run_padded(op, sample, leaves, spec, inputs, padding, fill, ref_outs, weights, how,
                               grad_fn)
        except Exception as e:
            results.append(Contamination(padding, _all_close(g_torch, ref, inputs), False,
                                         f"raises {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
        else:
            clean = _all_close(g, ref, inputs)
            detail = "" if clean else _describe(g, ref, inputs)
            results.append(Contamination(padding, _all_close(g_torch, ref, inputs), clean, detail))
        if first_only:
            break
    if not results:
        raise Skip("no padding can be discarded")
    return results


def _all_close(g, ref, inputs) -> bool:
    return all(_close(a, b) for a, b in zip(_zeros_for_none(g, inputs), ref, strict=True))


def _describe(g, ref, inputs) -> str:
    for i, (a, b) in enumerate(zip(_zeros_for_none(g, inputs), ref, strict=True)):
        if not _close(a, b):
            bad = (~a.isfinite() & b.isfinite()).sum().item()
            if bad:
                return f"input {i}: {bad} non-finite where the reference is finite"
            hidden = (a.isfinite() & ~b.isfinite()).sum().item()
            if hidden:
                return f"input {i}: {hidden} finite where the reference is non-finite (a genuine NaN/Inf lost)"
            return f"input {i}: finite but differs by {(a - b).abs().nan_to_num(0).max().item():.3g}"
    return ""


# -- per op ------------------------------------------------------------------------------------------------

# Kernels that do not check their inputs' shapes: padding one input corrupts the heap and kills the process.
UNCHECKED_SHAPES = {
    "native_batch_norm", "_native_batch_norm_legit", "_batch_norm_with_update",
    "nn.functional.scaled_dot_product_attention",
    # (op_db's entry from torch 2.14: a q padded along the batch beside an unpadded k/v is a double free)
    "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
    "_segment_reduce.offsets",
    "_segment_reduce.lengths",
    "grid_sampler_2d",
    "grid_sampler_3d",
    "nn.functional.grid_sample",
}
# entries of UNCHECKED_SHAPES that op_db has from this torch release on (older ones have no such entry)
UNCHECKED_SINCE = {"torch.ops.aten._scaled_dot_product_flash_attention_for_cpu": (2, 14)}


@dataclass
class OpRun:
    """What one op's check did: samples run, failures (one message each), skip reasons with counts."""

    run: int = 0
    failures: list[str] = field(default_factory=list)
    skips: Counter = field(default_factory=Counter)
    results: list[list[Contamination]] = field(default_factory=list)
    tried: dict[tuple, list[Padding]] = field(default_factory=dict)  # (dtype, sample index) -> paddings

    def outcome(self) -> str:
        """Contamination verdict over the samples: untried, clean in torch, removed or contaminated."""
        flat = [c for r in self.results for c in r]
        if not flat:
            return "untried"
        if not all(c.clean for c in flat):
            return "contaminated"
        return "clean in torch" if all(c.torch_clean for c in flat) else "removed"


def check_no_regression(op, grad_fn: GradFn, limit: int | None = None,
                        reference: GradFn = torch.autograd.grad) -> OpRun:
    """``no_regression`` on the first ``limit`` samples of each dtype."""
    r = OpRun()
    for dtype in DTYPES:
        for i, sample in enumerate(samples(op, dtype, limit)):
            try:
                msg = no_regression(op, sample, grad_fn, reference)
            except Skip as e:
                r.skips[str(e)] += 1
                continue
            r.run += 1
            if msg:
                r.failures.append(f"{dtype} sample {i}: {msg}")
    return r


def check_contamination(op, grad_fn: GradFn, *, how: str = "slice", fill: float = math.nan,
                        limit: int | None = None, tried: int | None = None, first_only: bool = True,
                        dtypes=(torch.float64,), only: dict[tuple, list[Padding]] | None = None) -> OpRun:
    """``contamination`` over the first ``limit`` samples, stopping after ``tried`` samples had a padding;
    ``only`` (an earlier run's ``tried``) restricts it to those samples and paddings."""
    r = OpRun()
    if op_id(op) in UNCHECKED_SHAPES:
        r.skips["kernel does not check shapes (padding crashes the process)"] += 1
        return r
    for dtype in dtypes:
        if only is not None:
            limit = max((i + 1 for d, i in only if d == dtype), default=0)
        for i, sample in enumerate(samples(op, dtype, limit)):
            if tried is not None and len(r.results) >= tried:
                break
            if only is not None and (dtype, i) not in only:
                continue
            try:
                res = contamination(op, sample, grad_fn, how=how, fill=fill, first_only=first_only,
                                    paddings=None if only is None else only[dtype, i])
            except Skip as e:
                r.skips[str(e)] += 1
                continue
            r.run += 1
            r.results.append(res)
            r.tried[dtype, i] = [c.padding for c in res]
            r.failures += [f"{dtype} sample {i}, {c.padding}: {c.detail}" for c in res if not c.clean]
    return r
